"""Layer 4: command-line flags shared by every entry point, YAML configs as flags, one-line errors."""
