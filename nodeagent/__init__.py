"""The node agent: runs one host's containers, wakes them on demand, sleeps them when idle.

One process per host; `nodeagent.agent` is its main."""
