"""Dev-only tools (not launch entry points): parity_autoattack (see launch/env_parity.sh)."""
