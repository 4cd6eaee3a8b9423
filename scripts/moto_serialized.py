"""moto server with its writing calls handled one at a time.

moto's server answers each request on its own thread, and its backends take no locks: two
PutRecords calls on one Kinesis shard at once can both read the same last sequence number and
the second overwrites the first record (readers that had not read it yet never see it), and
two conditional DynamoDB writes at once can both pass their condition. AWS does neither, and
GeoStream's guarantees rest on both. The AWS SDK retries a call whose answer is late while the
first try may still be running in moto, so the tests make such overlaps; this wrapper keeps
moto's threads (connections stay open) but lets one writing call at a time into its
application.
Run as moto_server is: python moto_serialized.py -H HOST -p PORT.
"""

import threading

import moto.server

_serve = moto.server.run_simple
_one_at_a_time = threading.Lock()


# The calls that change a stream or a table; reads (GetRecords, GetItem, Query, Scan) and the
# other services run beside them as before, so a slow scan holds no write back.
_WRITES = (
    ".PutRecords",
    ".PutRecord",
    ".PutItem",
    ".UpdateItem",
    ".DeleteItem",
    ".BatchWriteItem",
    ".TransactWriteItems",
)


def _serialized(app):
    def application(environ, start_response):
        if not environ.get("HTTP_X_AMZ_TARGET", "").endswith(_WRITES):
            return app(environ, start_response)
        with _one_at_a_time:
            # The whole answer is made inside the lock (a WSGI answer may be lazy).
            return list(app(environ, start_response))

    return application


def _run_simple(host, port, app, **options):
    return _serve(host, port, _serialized(app), **options)


moto.server.run_simple = _run_simple

if __name__ == "__main__":
    moto.server.main()
