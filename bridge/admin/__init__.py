"""Administration of a talkbridge fleet.

- ``fleet``: the fleet's state read from Redis (accounts, instances, streams,
  dead letters, the log stream), shared by ``talkbridge status`` / ``dlq``
  and the management page;
- ``passwords``: the ``[admin] Password`` forms (plain, scrypt, pbkdf2);
- ``auth``: sessions, CSRF tokens and the failed-login lockout, in Redis;
- ``web``: the management page (aiohttp, Jinja2 templates, server-sent events).

Importing this package imports none of them: the CLI pays only for what it uses.
"""
