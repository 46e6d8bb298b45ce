"""Which requests an edge gives the gateway: its routes, or every path when the config has a
gateway and no routes; and which cached routes a config with a gateway keeps."""

from __future__ import annotations

from edge.proxy import EdgeProxy, Target
from portside.net import Deadlines
from portside.spec import Config, ContainerClass, Gateway, Route

GATEWAY = Gateway("gateway.py", "async def fetch(request, env): pass\n")
CLASSES = (ContainerClass("A", "img"), ContainerClass("B", "img"))


class Resolver:
    async def resolve(self, class_name: str, instance_name: str, hint: str) -> Target:
        raise AssertionError("no resolve here")


def edge(config: Config) -> EdgeProxy:
    proxy = EdgeProxy("weur", Resolver(), Deadlines())
    proxy.set_config(config)
    return proxy


def test_a_gateway_without_routes_answers_every_path() -> None:
    proxy = edge(Config(classes=CLASSES, gateway=GATEWAY))
    for path in ("/", "/anything/at/all"):
        route = proxy._table.match(path)
        assert route is not None and route.gateway


def test_gateway_routes_beside_static_ones() -> None:
    routes = (Route("/api", gateway=True), Route("/static", class_name="A"))
    proxy = edge(Config(classes=CLASSES, routes=routes, gateway=GATEWAY))
    api, static = proxy._table.match("/api/x"), proxy._table.match("/static/y")
    assert api is not None and api.gateway
    assert static is not None and static.class_name == "A" and not static.gateway
    assert proxy._table.match("/other") is None


def test_with_a_gateway_the_routes_of_every_deployed_class_stay_cached() -> None:
    proxy = edge(Config(classes=CLASSES, routes=(Route("/a", class_name="A"),)))
    for cls in ("A", "B", "Gone"):
        proxy.cache.put(cls, "n", Target("node", "127.0.0.1:1", "n"))
    proxy.set_config(Config(classes=CLASSES, gateway=GATEWAY))
    assert [c for c in ("A", "B", "Gone") if proxy.cache.get(c, "n")] == ["A", "B"]
    proxy.set_config(Config(classes=CLASSES, routes=(Route("/a", class_name="A"),)))
    assert [c for c in ("A", "B") if proxy.cache.get(c, "n")] == ["A"]
