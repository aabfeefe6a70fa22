#!/usr/bin/env ruby
# frozen_string_literal: true

# Renders a BOSH job's templates the way the director (and `bosh create-env`) does,
# without the bosh CLI: the job spec's property defaults are merged with the given
# properties, and each template is evaluated with ERB in a context that offers `p`,
# `if_p` (with `.else` and `.else_if_p`), `spec` and `properties`.
#
#   ruby release/test/render.rb JOB_DIR PROPERTIES.json OUT_DIR [INSTANCE.json]
#
# PROPERTIES.json holds the properties as a manifest would give them (nested hashes,
# e.g. {"container_cpi": {"agent": {"mbus": "..."}}}); INSTANCE.json may override the
# instance spec (name, id, index, address, deployment, ip, az, bootstrap, networks).
# Every template named in the spec is written to OUT_DIR/<destination>, as under
# /var/vcap/jobs/<job>/. On a template error (a required property that is missing, a
# value the template refuses) it prints the error and the template's name to stderr
# and exits 1.
#
# Written for this repository's tests; the behaviour follows BOSH's documented
# template rules (properties not declared in the spec are not visible; a property
# that is absent or null takes the spec's default; `p` without a default raises when
# neither the manifest nor the spec gives a value).

require 'erb'
require 'fileutils'
require 'json'
require 'ostruct'
require 'shellwords'
require 'yaml'

# The director also loads ActiveSupport's `blank?`/`present?` for templates; use it
# when installed (Debian: ruby-activesupport). Our templates do not need it.
begin
  require 'active_support'
  require 'active_support/core_ext/object/blank'
rescue LoadError
  nil
end

module Render
  # A property the template asked for that has no value and no default.
  class UnknownProperty < StandardError
    def initialize(names)
      # The director's wording, which shows the list of names tried.
      super("Can't find property '#{names}'")
    end
  end

  # Follows a dotted name through nested hashes; nil when any step is missing.
  def self.lookup(hash, name)
    name.split('.').reduce(hash) do |ref, key|
      return nil unless ref.is_a?(Hash)

      ref = ref[key]
      return nil if ref.nil?

      ref
    end
  end

  # As BOSH does: a manifest value where the spec expects a hash of properties
  # (e.g. a string given for `a.b` when the spec declares `a.b.c`) is an error.
  def self.check_hashes(given, name)
    name.split('.').reduce(given) do |ref, key|
      unless ref.is_a?(Hash)
        raise ArgumentError, "Property '#{name}' expects a hash, but received '#{ref.class}'"
      end

      ref = ref[key]
      return if ref.nil?

      ref
    end
  end

  # The job's view of the properties: each property declared in the spec, with the
  # manifest's value or else the spec's default (nil when neither).
  def self.effective_properties(spec_properties, given)
    result = {}
    (spec_properties || {}).each do |name, definition|
      keys = name.split('.')
      check_hashes(given, name)
      value = lookup(given, name)
      value = (definition || {})['default'] if value.nil?
      dst = keys[0..-2].reduce(result) { |h, key| h[key] ||= {} }
      dst[keys[-1]] = value
    end
    result
  end

  # What `if_p` returns when one of its properties is missing: `.else` runs.
  class ActiveElse
    def initialize(context)
      @context = context
    end

    def else
      yield
    end

    def else_if_p(*names, &block)
      @context.if_p(*names, &block)
    end
  end

  # What `if_p` returns when its block ran: `.else` does nothing.
  class InactiveElse
    def else; end

    def else_if_p(*_names)
      InactiveElse.new
    end
  end

  # The object templates are evaluated in.
  class Context
    attr_reader :spec, :properties, :name, :index

    def initialize(job_name, raw_properties, instance)
      @raw_properties = raw_properties
      @name = job_name
      @index = instance['index']
      spec_hash = instance.merge('job' => { 'name' => job_name }, 'properties' => raw_properties)
      @spec = to_ostruct(spec_hash)
      @properties = to_ostruct(raw_properties)
    end

    def p(*args)
      names = Array(args[0])
      names.each do |n|
        value = Render.lookup(@raw_properties, n)
        return value unless value.nil?
      end
      return args[1] if args.length == 2

      raise UnknownProperty, names
    end

    def if_p(*names)
      values = names.map do |n|
        value = Render.lookup(@raw_properties, n)
        return ActiveElse.new(self) if value.nil?

        value
      end
      yield(*values)
      InactiveElse.new
    end

    def link(name)
      raise "link '#{name}' is not available in this harness (the job declares no links)"
    end

    def render(template_text, template_name)
      erb = ERB.new(template_text, trim_mode: '-')
      erb.filename = template_name
      erb.result(binding)
    end

    private

    def to_ostruct(object)
      case object
      when Hash then OpenStruct.new(object.transform_values { |v| to_ostruct(v) })
      when Array then object.map { |v| to_ostruct(v) }
      else object
      end
    end
  end

  DEFAULT_INSTANCE = {
    'name' => 'bosh',
    'id' => '5f1f5a6c-4d1e-4a58-9a3b-2f6c3c0b7e11',
    'index' => 0,
    'az' => 'z1',
    'bootstrap' => true,
    'deployment' => 'bosh',
    'address' => '10.245.0.3',
    'ip' => '10.245.0.3',
    'networks' => { 'default' => { 'ip' => '10.245.0.3', 'default' => %w[dns gateway] } }
  }.freeze

  def self.main(argv)
    unless [3, 4].include?(argv.length)
      warn 'usage: render.rb JOB_DIR PROPERTIES.json OUT_DIR [INSTANCE.json]'
      return 64
    end
    job_dir, properties_path, out_dir, instance_path = argv
    job_spec = YAML.safe_load(File.read(File.join(job_dir, 'spec')))
    given = JSON.parse(File.read(properties_path))
    instance = DEFAULT_INSTANCE.merge(instance_path ? JSON.parse(File.read(instance_path)) : {})
    begin
      raw = effective_properties(job_spec['properties'], given)
    rescue ArgumentError => e
      warn "Error filling in templates for job '#{job_spec['name']}': #{e.message}"
      return 1
    end
    context = Context.new(job_spec.fetch('name'), raw, instance)

    (job_spec['templates'] || {}).each do |source, destination|
      text = File.read(File.join(job_dir, 'templates', source))
      begin
        rendered = context.render(text, source)
      rescue StandardError => e
        warn "Error filling in template '#{source}' for job '#{job_spec['name']}': #{e.message}"
        return 1
      end
      path = File.join(out_dir, destination)
      FileUtils.mkdir_p(File.dirname(path))
      File.write(path, rendered)
      File.chmod(0o755, path) if destination.start_with?('bin/')
    end
    0
  end
end

exit(Render.main(ARGV)) if $PROGRAM_NAME == __FILE__
