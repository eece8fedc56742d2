"""Who a request comes from."""

import ipaddress

from django.conf import settings


def client_address(request) -> str | None:
    """The client's address, for the login lockout (axes) and the join link's limit.

    Behind TRUSTED_PROXY_COUNT proxies the last that many X-Forwarded-For entries are theirs (each appends the address that
    reached it), and the first of those is the client as the outermost proxy saw it; anything
    further left came from the client and is not trusted. REMOTE_ADDR, the connection's own
    address, with no trusted proxies, a header with too few entries (a request that did not
    pass them all) or an entry that is no address (a port after it is left out). Set the
    count only where the site cannot be reached but through those proxies: a client reaching
    it directly could name any address in the header."""
    remote = request.META.get("REMOTE_ADDR")
    count = settings.TRUSTED_PROXY_COUNT
    if count <= 0:
        return remote
    entries = [e.strip() for e in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    entries = [e for e in entries if e]
    if len(entries) < count:
        return remote
    entry = entries[-count]
    if entry.startswith("["):  # "[2001:db8::1]:443": some proxies append the client's port
        entry = entry[1:].partition("]")[0]
    elif entry.count(":") == 1:  # "198.51.100.7:51234"
        entry = entry.partition(":")[0]
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return remote
