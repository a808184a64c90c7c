"""fenghuo server: the relay process (Python orchestration over fenghuo.core)."""
