"""Pure, deterministic code: specs, states, rules. Safe to import inside workflows."""
