"""talkbridge core: config, events, bus, router, id map, daemon, CLI."""
