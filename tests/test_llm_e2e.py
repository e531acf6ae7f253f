"""Personas end to end, every part real and in its own process: the Talk test
server (a thread) sends a signed webhook to ``talkbridge run``, whose trigger
enqueues an arq job that ``talkbridge worker`` runs against a model — llama.cpp's
server with SmolLM2-135M, or the scripted FakeLLM — and the reply comes back
into the same Talk room through the bot API, threaded on the question.

And the crash: a worker killed with SIGKILL while the model is thinking; the
job runs again on a new worker and the room gets exactly one reply."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis as sync_redis

from tests.helpers import ConfigToml, Daemon, RedisServer, WorkerProcess, free_port, wait_for, wait_quiet
from tests.llama_rig import FakeLLM, LlamaServer, fake_llm_fixture, llama_server_fixture  # noqa: F401
from tests.talkbot_rig import SECRET, bot_section
from tests.talkserver import ThreadedTalkServer
from tests.talkserver.state import Actor, Bot, Message

TOKEN = "persona1"
ACCOUNT = "nctalkbot.inara"


def config(tmp_path: Path, redis_url: str, talk_url: str, http: int, endpoint: str, persona: str) -> Path:
    webhook = f"http://127.0.0.1:{http}/webhook/nextcloud/inara"
    config = ConfigToml().raw(bot_section("inara", talk_url, WebhookURL=webhook, Persona="inara", Timeout=5))
    config.api("a", free_port(), "api-token").gateway("g", (ACCOUNT, TOKEN), ("api.a", "api"))
    config.section("persona.inara", Name="Inara", Endpoint=endpoint).raw(persona)  # more of it, or sections after
    config.daemon(redis_url, http, LeaseSeconds=2, RetryBaseSeconds=0.05)
    return config.write(tmp_path / "talkbridge.toml")


@dataclass
class Bridge:
    talk: ThreadedTalkServer
    daemon: Daemon
    config: Path
    bot: Bot
    alice: Actor
    tmp: Path

    def bot_messages(self) -> list[Message]:
        return self.talk.call("bot_messages", TOKEN, self.bot)

    def worker(self, name: str = "worker") -> WorkerProcess:
        return WorkerProcess(self.config, self.tmp / f"{name}.log")


def make_bridge(tmp_path: Path, redis_server: RedisServer, endpoint: str, persona: str) -> Iterator[Bridge]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    talk = ThreadedTalkServer().start()
    http = free_port()
    path = config(tmp_path, redis_server.url, talk.url, http, endpoint, persona)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        alice = talk.call("add_user", "alice", "Alice")
        talk.call("create_room", "Ask Inara", TOKEN, (alice,))
        bot = talk.call("install_bot", "Inara", SECRET, f"http://127.0.0.1:{http}/webhook/nextcloud/inara")
        talk.call("enable_bot", bot, TOKEN)
        yield Bridge(talk, daemon, path, bot, alice, tmp_path)
    finally:
        daemon.stop()
        talk.stop()


def test_a_mention_in_talk_gets_the_models_reply_threaded(
    tmp_path: Path, redis_server: RedisServer, llama_server: LlamaServer
) -> None:
    persona = 'Model = "smollm2"\nSystemPrompt = "You are Inara. Answer in one short sentence."\n'
    persona += "MaxTokens = 32\nTemperature = 0.0\nTimeout = 120\n"
    gen = make_bridge(tmp_path, redis_server, llama_server.endpoint, persona)
    b = next(gen)
    worker = b.worker().start()
    try:
        question = b.talk.call("post", TOKEN, b.alice, "@Inara what is the capital of France?")
        [reply] = wait_for(b.bot_messages, timeout=120, what="the persona's reply in Talk")
        assert reply.parent_id == question.id  # threaded on the question
        assert reply.message.strip() and not reply.message.startswith("Sorry, Inara")
        # a window: the reply comes from an arq job, in no order with anything a sentinel could follow
        assert wait_quiet(lambda: len(b.bot_messages())) == 1
        # every webhook Talk sent was answered 200, and the worker logged no failure
        assert {c.status for c in b.talk.state.webhook_calls} == {200}
        assert "Traceback" not in worker.log()
    finally:
        worker.stop()
        gen.close()


def test_a_worker_killed_mid_call_the_job_runs_again_and_the_room_gets_one_reply(
    tmp_path: Path, redis_server: RedisServer, fake_llm: FakeLLM
) -> None:
    # JobTimeout 8 s: the persona's call may take 5 s of it; a killed worker's job is
    # taken by another worker once arq's in-progress mark expires (JobTimeout + 10 s)
    persona = 'Model = "fake"\nTimeout = 20\n\n[workers]\nJobTimeout = 8\n'
    gen = make_bridge(tmp_path, redis_server, fake_llm.endpoint, persona)
    b = next(gen)
    fake_llm.hold = True
    first = b.worker("first").start()
    second: WorkerProcess | None = None
    try:
        question = b.talk.call("post", TOKEN, b.alice, "are you there?")
        wait_for(lambda: fake_llm.held() == 1, timeout=30, what="the question at the model")
        first.kill()  # mid-call: the model is still thinking
        fake_llm.hold = False
        fake_llm.release()  # the dead worker's request: answered to nobody
        second = b.worker("second").start()
        [reply] = wait_for(b.bot_messages, timeout=60, what="the reply after the re-run")
        assert reply.message == "answer 2: Alice: are you there?"  # the second call: the re-run's
        assert reply.parent_id == question.id
        assert wait_quiet(lambda: len(b.bot_messages())) == 1  # a window: the dead job's run is in no order
        assert len(fake_llm.seen) == 2
        assert "try=2" in second.log()  # arq ran the same job again
    finally:
        if second is not None:
            second.stop()
        first.stop()
        gen.close()


def test_a_failing_model_gives_talk_a_short_message_not_a_trace(
    tmp_path: Path, redis_server: RedisServer, fake_llm: FakeLLM
) -> None:
    fake_llm.answer, fake_llm.status = "scripted", 500
    fake_llm.body = b'{"error": {"message": "Traceback (most recent call last): boom"}}'
    gen = make_bridge(tmp_path, redis_server, fake_llm.endpoint, 'Model = "fake"\n')
    b = next(gen)
    worker = b.worker().start()
    try:
        question = b.talk.call("post", TOKEN, b.alice, "hello")
        [reply] = wait_for(b.bot_messages, timeout=30, what="the error message in Talk")
        assert (
            reply.message == "Sorry, Inara cannot answer right now (the model service failed). The admin has been told."
        )
        assert reply.parent_id == question.id
        assert "persona inara" in worker.log() and "HTTP 500" in worker.log()  # the admin's detail: in the log
        assert wait_quiet(lambda: len(fake_llm.seen)) == 1  # no retry (arq's, in no order: a window)
    finally:
        worker.stop()
        gen.close()
