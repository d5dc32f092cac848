"""Service functions: the logic behind the routes, callable without a server.

They take a SQLAlchemy ``Session`` (and the ``Settings`` where needed), may flush, and never
commit: whoever opened the session owns the transaction. Errors are ``api.errors`` (or the
evaluator's) and carry their HTTP status. Import each from its module
(``api.services.submissions``, ...): this package re-exports nothing.
"""
