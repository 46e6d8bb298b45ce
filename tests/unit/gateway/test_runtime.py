"""The gateway runtime as pure logic: loading and swapping modules, env and its bindings, and
what a failing or slow handler answers. A fake Router, Lifecycle and RateLimiter stand in for
the edge and the control plane (tests/e2e/test_gateway.py runs the real ones)."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from collections.abc import Mapping, Sequence

import pytest
from prometheus_client import CollectorRegistry, Counter

from portside.client import Outbound
from portside.errors import GatewayError, GatewayTimeout, NoCapacity
from portside.gateway import GatewayRuntime, OutboundContext, Request, Response
from portside.instances import InstanceInfo
from portside.spec import Autoscaling, Config, ContainerClass, Gateway, OutboundPolicy, RateLimit
from portside.states import InstanceState


class Router:
    """Answers every fetch with "<class>/<name> <target>", recording the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, str, str]] = []

    async def fetch(
        self, class_name: str, name: str | None, request: Request, location_hint: str
    ) -> Response:
        self.calls.append((class_name, name, request.target, location_hint))
        body = await request.read()
        return Response(f"{class_name}/{name} {request.method} {request.target} {body!r}")


class Lifecycle:
    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    async def start(
        self,
        class_name: str,
        name: str,
        *,
        entrypoint: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        location_hint: str | None = None,
    ) -> InstanceInfo:
        self.calls.append(("start", class_name, name, entrypoint, env, location_hint))
        return InstanceInfo(class_name, name, state=InstanceState.RUNNING)

    async def stop(
        self, class_name: str, name: str, signal: int = 15, grace: float = 10.0
    ) -> InstanceInfo:
        self.calls.append(("stop", class_name, name, signal, grace))
        return InstanceInfo(class_name, name, state=InstanceState.STOPPED)

    async def signal(self, class_name: str, name: str, signal: int) -> None:
        self.calls.append(("signal", class_name, name, signal))

    async def destroy(self, class_name: str, name: str) -> None:
        self.calls.append(("destroy", class_name, name))

    async def state(self, class_name: str, name: str) -> InstanceInfo:
        self.calls.append(("state", class_name, name))
        return InstanceInfo(class_name, name, state=InstanceState.RUNNING)

    async def set_outbound(
        self, class_name: str, name: str, policy: OutboundPolicy | None
    ) -> Outbound:
        self.calls.append(("set_outbound", class_name, name, policy))
        return Outbound(policy or OutboundPolicy(), own=policy is not None)

    async def outbound(self, class_name: str, name: str) -> Outbound:
        self.calls.append(("outbound", class_name, name))
        return Outbound(OutboundPolicy(), own=False)


class Limiter:
    """Admits the first `limit` calls per (binding, key)."""

    def __init__(self, limit: int = 2) -> None:
        self.limit_ = limit
        self.counts: dict[tuple[str, str], int] = {}

    async def limit(self, binding: str, key: str) -> bool:
        n = self.counts[binding, key] = self.counts.get((binding, key), 0) + 1
        return n <= self.limit_


CLASSES = (
    ContainerClass("CodeExecutor", "img"),
    ContainerClass("api-v2", "img", binding="V2"),
    ContainerClass("Workers", "img", autoscaling=Autoscaling()),
)


def config(source: str, *, deadline_s: float = 5.0, **gateway: object) -> Config:
    return Config(
        classes=CLASSES,
        gateway=Gateway(
            module="gateway.py",
            source=textwrap.dedent(source),
            deadline_s=deadline_s,
            **gateway,  # type: ignore[arg-type]
        ),
    )


METRICS = CollectorRegistry()
ERRORS = Counter("gateway_errors", "The runtime's failures, by kind.", ["kind"], registry=METRICS)


def runtime(secrets: Mapping[str, str] | None = None) -> tuple[GatewayRuntime, Router, Lifecycle]:
    router, lifecycle = Router(), Lifecycle()
    gateway = GatewayRuntime(router, lifecycle, Limiter(), secrets or {}, errors=ERRORS)
    return gateway, router, lifecycle


def errors(kind: str) -> float:
    return METRICS.get_sample_value("gateway_errors_total", {"kind": kind}) or 0.0


ECHO = """
    from portside.gateway import Response

    async def fetch(request, env):
        return Response("v1 " + request.path)
"""


async def test_fetch_runs_the_module_and_a_new_digest_swaps_it() -> None:
    rt, _, _ = runtime()
    rt.load(config(ECHO))
    assert await (await rt.fetch(Request("/a"))).text() == "v1 /a"
    first = rt.digest
    rt.load(config(ECHO.replace("v1", "v2")))
    assert rt.digest != first
    assert await (await rt.fetch(Request("/a"))).text() == "v2 /a"


async def test_a_request_in_flight_finishes_on_the_module_it_started_with() -> None:
    slow = """
        import asyncio
        from portside.gateway import Response
        VERSION = "old"

        async def fetch(request, env):
            await asyncio.sleep(0.2)
            return Response(VERSION)
    """
    rt, _, _ = runtime()
    rt.load(config(slow))
    in_flight = asyncio.create_task(rt.fetch(Request("/")))
    await asyncio.sleep(0.05)
    rt.load(config(slow.replace('"old"', '"new"')))
    assert await (await in_flight).text() == "old"
    assert await (await rt.fetch(Request("/"))).text() == "new"


async def test_the_same_digest_keeps_the_module_and_takes_the_new_env() -> None:
    source = """
        from portside.gateway import Response
        LOADS = []
        LOADS.append(1)

        async def fetch(request, env):
            return Response(f"{len(LOADS)} {env.vars['COLOR']}")
    """
    rt, _, _ = runtime()
    rt.load(config(source, vars={"COLOR": "red"}))
    rt.load(config(source, vars={"COLOR": "blue"}))
    assert await (await rt.fetch(Request("/"))).text() == "1 blue"


async def test_a_module_that_fails_to_load_answers_gateway_error_until_a_good_deploy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt, _, _ = runtime()
    rt.load(config(ECHO))
    before = errors("gateway-error")
    with caplog.at_level(logging.ERROR):
        rt.load(config("import no_such_package_here\n\nasync def fetch(request, env): pass\n"))
    assert "No module named 'no_such_package_here'" in caplog.text
    assert rt.configured and rt.digest == ""
    with pytest.raises(GatewayError, match="failed to load"):
        await rt.fetch(Request("/"))
    assert errors("gateway-error") == before + 1
    rt.load(config(ECHO))
    assert (await rt.fetch(Request("/"))).ok


async def test_a_raising_handler_is_one_line_for_the_client_and_a_traceback_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt, _, _ = runtime()
    rt.load(
        config(
            """
            async def fetch(request, env):
                secret = "s3cr3t"
                raise ValueError(f"bad {secret}")
            """
        )
    )
    before = errors("gateway-error")
    with caplog.at_level(logging.ERROR), pytest.raises(GatewayError) as failure:
        await rt.fetch(Request("/x"))
    assert (
        str(failure.value) == "the gateway's fetch raised ValueError; the traceback is in the log"
    )
    assert "s3cr3t" not in str(failure.value)
    # The traceback names the module's file, its digest and the failing line.
    assert "gateway.py@" in caplog.text and 'raise ValueError(f"bad {secret}")' in caplog.text
    assert errors("gateway-error") == before + 1


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("return 'text'", "returned str, not a Response"),
        ("import sys; sys.exit(3)", "raised SystemExit"),
        ("raise KeyboardInterrupt", "raised KeyboardInterrupt"),
        ("raise TimeoutError('its own')", "raised TimeoutError"),
    ],
)
async def test_what_a_handler_does_wrong_is_a_gateway_error(body: str, match: str) -> None:
    rt, _, _ = runtime()
    rt.load(config(f"async def fetch(request, env):\n    {body}\n"))
    with pytest.raises(GatewayError, match=match) as failure:
        await rt.fetch(Request("/"))
    assert type(failure.value) is GatewayError


async def test_a_handler_past_the_deadline_is_a_gateway_timeout() -> None:
    rt, _, _ = runtime()
    rt.load(
        config(
            "import asyncio\n\nasync def fetch(request, env):\n    await asyncio.sleep(5)\n",
            deadline_s=0.05,
        )
    )
    before = errors("gateway-timeout")
    with pytest.raises(GatewayTimeout, match=r"deadline \(0.05s\)"):
        await rt.fetch(Request("/"))
    assert errors("gateway-timeout") == before + 1


async def test_a_portside_error_through_a_binding_keeps_its_kind() -> None:
    class Full(Router):
        async def fetch(
            self, class_name: str, name: str | None, request: Request, location_hint: str
        ) -> Response:
            raise NoCapacity("no node has room")

    rt = GatewayRuntime(Full(), Lifecycle(), Limiter(), {}, errors=ERRORS)
    rt.load(config("async def fetch(request, env):\n    return await env.WORKERS.fetch(request)\n"))
    before = errors("no-capacity")
    with pytest.raises(NoCapacity):
        await rt.fetch(Request("/"))
    assert errors("no-capacity") == before + 1


async def test_no_gateway_or_no_handler_is_a_gateway_error() -> None:
    rt, _, _ = runtime()
    with pytest.raises(GatewayError, match="no gateway module is deployed"):
        await rt.fetch(Request("/"))
    rt.load(config(ECHO))
    assert rt.has("fetch") and not rt.has("outbound")
    with pytest.raises(GatewayError, match="defines no outbound"):
        await rt.outbound("outbound", Request("/"), OutboundContext("A", "a", "c1"))
    rt.load(Config(classes=CLASSES))
    assert not rt.configured and not rt.has("fetch")


async def test_bindings_reach_named_instances_pools_and_random_ones() -> None:
    rt, router, _ = runtime()
    rt.load(
        config(
            """
            from portside.gateway import Request, Response

            async def fetch(request, env):
                if request.path == "/named":
                    return await env.CODE_EXECUTOR.get("s-1", location_hint="weur").fetch(request)
                if request.path == "/made":
                    return await env.V2.get("x").fetch("/p?q=1", method="post", body=b"hi")
                if request.path == "/random":
                    return await env.V2.get_random(4).fetch("/")
                return await env.WORKERS.fetch(request)
            """
        )
    )
    named = await rt.fetch(Request("http://h/named", method="PUT", body=b"data"))
    assert await named.text() == "CodeExecutor/s-1 PUT /named b'data'"
    made = await rt.fetch(Request("/made"))
    assert await made.text() == "api-v2/x POST /p?q=1 b'hi'"
    await rt.fetch(Request("/pool"))
    for _ in range(20):
        await rt.fetch(Request("/random"))
    assert router.calls[0] == ("CodeExecutor", "s-1", "/named", "weur")
    assert router.calls[2] == ("Workers", None, "/pool", "")
    assert {name for _, name, _, _ in router.calls[3:]} <= {f"instance-{i}" for i in range(4)}


async def test_a_named_class_binding_has_no_pool_fetch_and_env_names_its_bindings() -> None:
    rt, _, _ = runtime()
    rt.load(
        config(
            """
            async def fetch(request, env):
                if request.path == "/pool":
                    return await env.CODE_EXECUTOR.fetch(request)
                return env.NOPE
            """,
            rate_limits=(RateLimit("LIMITER", 2, 60.0),),
        )
    )
    env = rt._deployed.env if rt._deployed else None
    assert env is not None
    with pytest.raises(AttributeError, match="CODE_EXECUTOR, LIMITER, V2, WORKERS"):
        _ = env.NOPE
    with pytest.raises(TypeError, match=r"use env.CODE_EXECUTOR.get\(name\).fetch"):
        await env.CODE_EXECUTOR.fetch("/")
    # Through a handler, the same mistakes are the handler's failure.
    with pytest.raises(GatewayError, match="raised AttributeError"):
        await rt.fetch(Request("/other"))


async def test_stub_lifecycle_calls_go_to_the_lifecycle_with_the_sdk_arguments() -> None:
    rt, _, lifecycle = runtime()
    rt.load(
        config(
            """
            from portside.gateway import Response

            async def fetch(request, env):
                box = env.CODE_EXECUTOR.get("s-9", location_hint="enam")
                await box.start(env={"A": "1"})
                await box.signal(1)
                info = await box.stop(grace=2)
                await box.destroy()
                return Response((await box.state()).state.value + " " + info.state.value)
            """
        )
    )
    assert await (await rt.fetch(Request("/"))).text() == "running stopped"
    assert lifecycle.calls == [
        ("start", "CodeExecutor", "s-9", None, {"A": "1"}, "enam"),
        ("signal", "CodeExecutor", "s-9", 1),
        ("stop", "CodeExecutor", "s-9", 15, 2),
        ("destroy", "CodeExecutor", "s-9"),
        ("state", "CodeExecutor", "s-9"),
    ]


async def test_vars_secrets_and_rate_limiters() -> None:
    secrets = {"API_KEY": "k-1"}
    rt, _, _ = runtime(secrets)
    rt.load(
        config(
            """
            from portside.gateway import Response

            async def fetch(request, env):
                if request.headers.get("x-key") != env.secrets["API_KEY"]:
                    return Response("no\\n", status=401)
                if not await env.LIMITER.limit(key=request.headers["x-key"]):
                    return Response("slow\\n", status=429)
                return Response(env.vars["GREETING"])
            """,
            vars={"GREETING": "hello"},
            rate_limits=(RateLimit("LIMITER", 2, 60.0),),
        )
    )
    key = {"x-key": "k-1"}
    assert [(await rt.fetch(Request("/", headers=key))).status for _ in range(3)] == [200, 200, 429]
    assert (await rt.fetch(Request("/"))).status == 401
    secrets["API_KEY"] = "k-2"  # a secret put shows at once
    assert (await rt.fetch(Request("/", headers={"x-key": "k-2"}))).status == 200
    env = rt._deployed.env if rt._deployed else None
    assert env is not None and "k-2" not in repr(env.secrets)
    with pytest.raises(KeyError, match="portside secret put MISSING"):
        env.secrets["MISSING"]


async def test_outbound_handlers_get_the_context() -> None:
    rt, _, _ = runtime()
    rt.load(
        config(
            """
            from portside.gateway import Response

            async def outbound(request, env, ctx):
                return Response(f"any {ctx.class_name}/{ctx.instance} {ctx.container_id}")

            async def billing(request, env, ctx):
                return Response("billing " + request.host)
            """
        )
    )
    ctx = OutboundContext("CodeExecutor", "s-1", "c0ffee")
    any_host = await rt.outbound("outbound", Request("http://x.example/"), ctx)
    assert await any_host.text() == "any CodeExecutor/s-1 c0ffee"
    billing = await rt.outbound("billing", Request("http://billing.internal/"), ctx)
    assert await billing.text() == "billing billing.internal"


async def test_a_handler_that_swallows_the_cancellation_still_times_out() -> None:
    rt, _, _ = runtime()
    rt.load(
        config(
            """
            import asyncio
            from portside.gateway import Response

            async def fetch(request, env):
                try:
                    await asyncio.sleep(5)
                except asyncio.CancelledError:
                    pass
                return Response("late")
            """,
            deadline_s=0.05,
        )
    )
    with pytest.raises(GatewayTimeout):
        await rt.fetch(Request("/"))


async def test_stub_outbound_policy_calls() -> None:
    rt, _, lifecycle = runtime()
    rt.load(
        config(
            """
            from portside.gateway import Response

            async def fetch(request, env):
                box = env.CODE_EXECUTOR.get("s-1")
                own = await box.set_outbound(allowed_hosts=["api.example.com"])
                await box.clear_outbound()
                now = await box.outbound()
                return Response(f"{own.own} {now.own}")
            """
        )
    )
    assert await (await rt.fetch(Request("/"))).text() == "True False"
    assert lifecycle.calls == [
        (
            "set_outbound",
            "CodeExecutor",
            "s-1",
            OutboundPolicy(allowed_hosts=("api.example.com",)),
        ),
        ("set_outbound", "CodeExecutor", "s-1", None),
        ("outbound", "CodeExecutor", "s-1"),
    ]
