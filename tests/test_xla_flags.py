"""The CPU flags are added for the measured jaxlib only, never over the user's own setting."""

import importlib.metadata

from clip_lora_jax import xla_flags


def test_flags_added_for_measured_jaxlib_and_user_settings_win(monkeypatch):
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert xla_flags.use_fast_cpu_flags(env) == ("--xla_cpu_experimental_ynn_fusion_type=",)
  assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=4 "
                              "--xla_cpu_experimental_ynn_fusion_type=")
  assert xla_flags.use_fast_cpu_flags(env) == ()  # Idempotent.
  user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert xla_flags.use_fast_cpu_flags(user) == () and user["XLA_FLAGS"].endswith("=dot")
  opt_out = {"CLIP_LORA_JAX_DEFAULT_XLA": "1"}
  assert xla_flags.use_fast_cpu_flags(opt_out) == () and "XLA_FLAGS" not in opt_out


def test_no_flags_for_other_jaxlib_versions(monkeypatch):
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.0")
  env = {}
  assert xla_flags.use_fast_cpu_flags(env) == () and env == {}


def test_compilation_cache_defaults_under_the_library_cache_and_user_settings_win(monkeypatch):
  monkeypatch.setenv("CLIP_LORA_JAX_CACHE", "/somewhere/cache")
  env = {}
  assert xla_flags.use_compilation_cache(env) == "/somewhere/cache/jax_compilation"
  assert env == {"JAX_COMPILATION_CACHE_DIR": "/somewhere/cache/jax_compilation",
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  user = {"JAX_COMPILATION_CACHE_DIR": "/mine", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2"}
  assert xla_flags.use_compilation_cache(user) == "/mine"
  assert user == {"JAX_COMPILATION_CACHE_DIR": "/mine",
                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2"}
