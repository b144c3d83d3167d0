"""Songs given as links: the web's use of the shared egress guard (services/common/egress.py),
which ingestion's solo imports go through as well."""

from services.common.egress import (  # noqa: F401 - the web's names for them
    DEFAULT_PORTS,
    MAX_URL_LENGTH,
    EgressGuard,
    LinkError,
    check_url,
    download,
    fetch,
    is_internal,
    resolve_host,
)
