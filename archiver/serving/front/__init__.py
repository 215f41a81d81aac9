"""The front process's HTTP side (never torch): the aiohttp apps, routes, page, OpenAPI, metrics, server."""
