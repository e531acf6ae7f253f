"""A Nextcloud Talk server for tests, faithful to what the adapters call.

See ``server.py`` for the Python API, ``bot_api.py`` for the bot endpoints
and ``webhooks.py`` for what Talk sends. Modelled on spreed's sources (Talk
21 / Nextcloud 31 for bots; ``version=19`` for the Talk 19 shape observed on
real servers in /work/shared/reference/protocols.md).
"""

from tests.talkserver.phpjson import php_json_encode
from tests.talkserver.server import TalkServer, ThreadedTalkServer
from tests.talkserver.state import Actor, Bot, Message, Room, TalkState

__all__ = ["Actor", "Bot", "Message", "Room", "TalkServer", "TalkState", "ThreadedTalkServer", "php_json_encode"]
