"""A Matterbridge 1.26 for the test suite: its ``api`` accounts and the part
of its gateway router that decides what reaches them, faithful to
42wim/matterbridge at e68ddcf5c1c579b29b73e908ead263fa1ebbc694 (each module
cites the Go file and function it follows; where a file is not stored at
that commit, the nearest stored version is named).

Modules: ``api`` (bridge/api/api.go and echo), ``melody`` (the WebSocket
hub), ``ring`` (golang-ring), ``gateway`` (gateway/router.go, gateway.go,
handlers.go), ``gojson`` (config.Message as Go's encoding/json reads and
writes it), ``goscan`` (Go's JSON scanner), ``server`` (config, accounts,
control), ``rig`` (the server as a real process).

Config (a dict, or a JSON file for the process)::

    {"accounts": {"api.tb": {"BindAddress": "127.0.0.1:PORT", "Token": "s3cret", "Buffer": 0},
                  "irc.libera": {"RemoteNickFormat": "[{PROTOCOL}] <{NICK}> "}},
     "gateways": [{"name": "gw1", "inout": [{"account": "api.tb", "channel": "api"},
                                            {"account": "irc.libera", "channel": "#talk"}],
                   "in": [], "out": []}],
     "general": {},                     # [general]: the fallback of every account's keys
     "melody": {"PingPeriod": 54, "PongWait": 60},   # only to shorten them in a test
     "control": "127.0.0.1:PORT"}       # the control listener (optional in-process)

An account's protocol is its name's part before the dot. ``api`` accounts
get the real HTTP API (keys: BindAddress, Token, Buffer, RemoteNickFormat,
Label, IgnoreNicks, IgnoreMessages, ReplaceMessages, ReplaceNicks,
StripNick, ShowJoinPart, ...); every other account is a scripted network
account. A gateway's ``enable`` defaults to true here (Matterbridge's to
false). Refused: SameChannel, PreserveThreading, ExtractNicks, media
servers, Tengo.

Control, in-process (``MatterbridgeServer(config)``, ``await start()`` /
``await stop()`` or ``async with``)::

    await mb.say(account, channel, text, username, userid="", event="",
                 parent_id="", extra=None, id="")   # a network account hears this on its network
    mb.heard(account) -> list[dict]    # what the gateway sent to a network account (Go's JSON of each)
    mb.ring(account) -> int            # how many messages an api account's ring holds
    mb.streams(account) -> int         # /api/stream handlers still running (in-process only)

and over HTTP at ``config["control"]`` (the same three)::

    POST /say            {"account": ..., "channel": ..., "text": ..., "username": ..., ...} -> {"ok": true}
    GET  /heard?account=irc.libera  -> [message, ...]
    GET  /ring?account=api.tb       -> {"size": N}

As a process: ``python -m tests.mbserver CONFIG.json`` prints ``ready`` once
every listener is up; ``tests.mbserver.rig.MatterbridgeProcess`` starts it,
SIGKILLs and restarts it (the ring is memory: a restart loses it, as
Matterbridge's does).

Where this server is not Matterbridge (guesses and simplifications):
gateways and bridges are walked in config order (Go walks maps in random
order); timestamps are in UTC; JSON syntax and type errors are Go's
(goscan.py), but a bad ``timestamp``'s parse error is shortened and
nesting past 400 levels is refused (Go: 10,000); aiohttp refuses a text
frame that is not UTF-8 (gorilla passes it on); a
multipart form is not parsed (only its boundary is looked for), an
urlencoded one as far as url.ParseQuery's errors; mapstructure's error
texts for a bad Extra.file are shortened (they never reach a client: only
the "got string" rule matters, and it is Go's); golang-ring is the
vendored copy read at matterbridge 6ceb1e40 (a version with the locks; all
stored versions with them give ``[]`` for an empty ring), not checked
against the 2022-03-30 version 1.26 pins line by line; echo v4.10.2's own
files are not stored: KeyAuth, bind and the error handler follow stored
echo v4 versions of the same shape (key_auth.go with ErrKeyAuthMissing,
bind.go with the explicit-tag bindData), the router's 405/OPTIONS/HEAD
answers follow what is known of echo 4.10's router.go.
"""

from tests.mbserver.gojson import FileInfo, Message
from tests.mbserver.server import ConfigError, MatterbridgeServer, load_config

__all__ = ["ConfigError", "FileInfo", "MatterbridgeServer", "Message", "load_config"]
