"""Chat operations and the events they fire (ChatManager, ReactionManager,
BotService listeners). Every route and the Python API go through here, so a
message posted any way triggers the same webhooks.
"""

from __future__ import annotations

import time
import unicodedata

import regex

from tests.talkserver import webhooks
from tests.talkserver.state import (
    FEATURE_REACTION,
    FEATURE_WEBHOOK,
    MAX_REFERENCE_ID,
    Actor,
    Bot,
    Message,
    TalkState,
)


class ChatError(Exception):
    """A failure the controller turns into a status code."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind  # not_found | too_long | invalid | exists | not_supported


class Chat:
    def __init__(self, state: TalkState, sender: webhooks.WebhookSender) -> None:
        self.state = state
        self.sender = sender

    async def send_message(
        self,
        token: str,
        actor: Actor,
        text: str,
        parent: Message | None = None,
        reference_id: str = "",
        silent: bool = False,
        by_bot: bool = False,
    ) -> Message:
        """ChatManager::sendMessage, then ChatMessageSentEvent -> bots."""
        text = php_trim(text)  # Comment::setMessage trims (PHP's trim: non-breaking spaces stay)
        if len(text) > self.state.max_chat_length:  # mb_strlen
            raise ChatError("too_long")
        ref = php_trim(reference_id) if reference_id else ""
        if len(ref) > MAX_REFERENCE_ID:  # the DB column refuses it
            raise ChatError("invalid")
        if by_bot:
            message, params = text, []  # a bot's message is stored as written
        else:
            message, params = webhooks.parse_mentions(self.state, text)
        msg = self.state.add_message(
            token,
            actor,
            message,
            params,
            reference_id=ref or None,
            parent_id=parent.id if parent is not None else None,
            silent=silent,
        )
        if not by_bot:  # "No bots for bots": a bot's own message never triggers webhooks
            room = self.state.rooms[token]
            bots = self.state.bots_for_token(token, FEATURE_WEBHOOK)
            await self.sender.send(bots, webhooks.create_payload(self.state, room, msg))
        return msg

    async def system_message(
        self, token: str, actor: Actor, name: str, message: str, params: dict | list, parent: Message | None
    ) -> Message:
        msg = self.state.add_message(
            token, actor, message, params, message_type="system", system_message=name,
            parent_id=parent.id if parent is not None else None,
        )  # fmt: skip
        room = self.state.rooms[token]
        await self.sender.send(self.state.bots_for_token(token, FEATURE_WEBHOOK), webhooks.activity_payload(room, msg))
        return msg

    def target(self, token: str, message_id: int) -> Message:
        msg = self.state.messages.get(message_id)
        if msg is None or msg.token != token:
            raise ChatError("not_found")
        return msg

    async def add_reaction(self, token: str, actor: Actor, message_id: int, emoji: str) -> Message:
        """ReactionManager::addReactionMessage + ReactionAddedEvent."""
        msg = self.target(token, message_id)
        if msg.message_type != "comment":
            raise ChatError("not_supported")
        if not valid_emoji(emoji):
            raise ChatError("invalid")
        who = msg.reactions.setdefault(emoji, [])
        if actor.ref in who:
            raise ChatError("exists")
        who.append(actor.ref)
        await self._reaction_events(token, actor, msg, emoji, added=True)
        return msg

    async def remove_reaction(self, token: str, actor: Actor, message_id: int, emoji: str) -> Message:
        msg = self.target(token, message_id)
        if msg.message_type != "comment":
            raise ChatError("not_found")
        who = msg.reactions.get(emoji, [])
        if actor.ref not in who:
            raise ChatError("not_found")
        who.remove(actor.ref)
        if not who:
            del msg.reactions[emoji]
        await self._reaction_events(token, actor, msg, emoji, added=False)
        return msg

    async def _reaction_events(self, token: str, actor: Actor, msg: Message, emoji: str, added: bool) -> None:
        # ReactionManager: a reaction is a comment of verb "reaction" whose
        # message is the emoji (chat readers see it as a system message
        # "reaction"). Revoking turns that comment into "reaction_deleted" and
        # adds a system message "reaction_revoked" that does not name the emoji.
        if added:
            await self.system_message(token, actor, "reaction", emoji, [], msg)
        else:
            for other in reversed(self.state.room_messages(token)):
                if (
                    other.system_message == "reaction"
                    and other.parent_id == msg.id
                    and other.actor.ref == actor.ref
                    and other.message == emoji
                ):
                    other.system_message, other.message = "reaction_deleted", "Reaction deleted by author"
                    break
            params = {"actor": actor_parameter(actor)}
            await self.system_message(token, actor, "reaction_revoked", "{actor} deleted a reaction", params, msg)
        # ... and, from Talk 21, the Like / Undo hook for bots with the reaction feature
        # (the reacting bot included: Talk does not skip it).
        if self.state.version >= 21:
            room = self.state.rooms[token]
            bots = self.state.bots_for_token(token, FEATURE_REACTION)
            build = webhooks.like_payload if added else webhooks.undo_payload
            await self.sender.send(bots, build(self.state, room, msg, actor, emoji))

    async def edit_message(self, token: str, actor: Actor, msg: Message, text: str) -> Message:
        """ChatManager::editMessage: the comment changes in place, and a system
        message "message_edited" whose parent is the comment tells every reader."""
        if php_trim(text) == "":
            raise ChatError("invalid")
        text = php_trim(text)
        if len(text) > self.state.max_chat_length:
            raise ChatError("too_long")
        msg.message, msg.parameters = webhooks.parse_mentions(self.state, text)
        msg.edited_by, msg.edited_at = actor, int(time.time())
        params = {"actor": actor_parameter(actor)}
        return await self.system_message(token, actor, "message_edited", "{actor} edited a message", params, msg)

    async def delete_message(self, token: str, actor: Actor, msg: Message) -> Message:
        """ChatManager::deleteMessage: the comment becomes "comment_deleted",
        a shared file's share is removed, and "message_deleted" follows."""
        msg.message_type = "comment_deleted"
        msg.message = "Message deleted by {actor}"
        msg.parameters = {"actor": actor_parameter(actor)}
        if msg.share is not None:
            msg.share.deleted = True
            msg.share = None
        params = {"actor": actor_parameter(actor)}
        return await self.system_message(token, actor, "message_deleted", "{actor} deleted a message", params, msg)

    async def enable_bot(self, bot: Bot, token: str) -> bool:
        """BotController::enableBot / occ talk:bot:setup; False if already enabled."""
        room = self.state.rooms[token]
        if room.federated:
            raise ChatError("invalid")  # Talk refuses bots in federated rooms
        if bot.id in room.bots:
            return False
        room.bots.add(bot.id)
        await self.sender.send([bot], webhooks.join_payload(room, bot, "Join"))
        return True

    async def disable_bot(self, bot: Bot, token: str) -> None:
        room = self.state.rooms[token]
        room.bots.discard(bot.id)
        await self.sender.send([bot], webhooks.join_payload(room, bot, "Leave"))


def actor_parameter(actor: Actor) -> dict[str, str]:
    """The rich-object parameter SystemMessage gives an actor."""
    kind = {"users": "user", "guests": "guest", "federated_users": "user", "bots": "user"}.get(actor.type, "user")
    return {"type": kind, "id": actor.id, "name": actor.display_name}


def php_trim(text: str) -> str:
    """PHP's ``trim()`` with its default characters: space, tab, LF, CR, NUL
    and vertical tab, and no other (``str.strip`` also takes NBSP and friends)."""
    return text.strip(" \t\n\r\0\x0b")


# IntlChar::charType categories EmojiHelper lets through in a string of two
# bytes or more ("Cn": ICU's GENERAL_OTHER_TYPES is the unassigned category).
EMOJI_PART_CATEGORIES = frozenset({"Sk", "Lm", "So", "Cf", "Po", "Ll", "Sm", "Me", "Nd", "Pd", "Cn"})
ZERO_WIDTH_JOINER, VARIATION_SELECTOR_16 = 0x200D, 0xFE0F


def valid_emoji(value: str) -> bool:
    """Nextcloud's ``EmojiHelper::isValidSingleEmoji`` (lib/private/EmojiHelper.php).

    Exactly one extended grapheme cluster (ICU's character break iterator;
    the stdlib has no grapheme segmentation, ``regex``'s ``\\X`` is UAX #29),
    and every code point of a general category emoji are made of — or, in a
    one-byte string, only a ZWJ or VS16, so no ASCII letter, digit or sign.
    Faithful to its leniency too: a lone "é" (Ll, two UTF-8 bytes) passes.
    Categories come from Python's Unicode tables, not ICU's: the same for
    every assigned emoji, apart from the version each knows.
    """
    if len(regex.findall(r"\X", value)) != 1:
        return False
    multibyte = len(value.encode()) >= 2  # PHP's strlen counts bytes
    for ch in value:
        if multibyte and unicodedata.category(ch) in EMOJI_PART_CATEGORIES:
            continue
        if ord(ch) in (ZERO_WIDTH_JOINER, VARIATION_SELECTOR_16):
            continue
        return False
    return True
