#!/bin/sh
# Gateway start: writes nginx's upstream servers (the service replicas) from GATEWAY_UPSTREAMS, then runs nginx in
# the foreground. docker/nginx.conf includes the file it writes. Both gateway images run it (compose mounts it).
#
#   GATEWAY_UPSTREAMS="service:8000"                    default: on a compose network the name resolves to every
#                                                       replica of `docker compose up --scale service=N`
#   GATEWAY_UPSTREAMS="127.0.0.1:8000 127.0.0.1:8001"   host networking: one address per replica
#
# Passive health checks: a replica that fails GATEWAY_MAX_FAILS (2) times is skipped for GATEWAY_FAIL_TIMEOUT (10s).
# With arguments it runs them instead of nginx once the file is written (e.g. `... nginx -s reload`).
set -eu
set -f  # addresses are words, never file patterns

out=${GATEWAY_UPSTREAMS_FILE:-/tmp/nginx-upstreams.conf}
upstreams=${GATEWAY_UPSTREAMS:-service:8000}
max_fails=${GATEWAY_MAX_FAILS:-2}
fail_timeout=${GATEWAY_FAIL_TIMEOUT:-10s}

case "$max_fails" in ''|*[!0-9]*) echo "gateway-start: GATEWAY_MAX_FAILS must be a number, not '$max_fails'" >&2; exit 64;; esac
case "$fail_timeout" in ''|*[!0-9smh]*) echo "gateway-start: bad GATEWAY_FAIL_TIMEOUT '$fail_timeout'" >&2; exit 64;; esac

lines=""
for address in $upstreams; do
    case "$address" in
        *:*[!0-9]*|*[!A-Za-z0-9.:_-]*|:*|*:)
            # host:port, port a number; no spaces, quotes or semicolons can reach nginx.conf
            echo "gateway-start: bad upstream '$address' in GATEWAY_UPSTREAMS (want host:port ...)" >&2; exit 64;;
        *:*) ;;
        *) echo "gateway-start: upstream '$address' has no port (want host:port)" >&2; exit 64;;
    esac
    lines="${lines}server $address max_fails=$max_fails fail_timeout=$fail_timeout;
"
done
[ -n "$lines" ] || { echo "gateway-start: GATEWAY_UPSTREAMS is empty" >&2; exit 64; }
printf '%s' "$lines" > "$out.tmp"
mv "$out.tmp" "$out"

if [ "$#" -gt 0 ]; then
    exec "$@"
fi
exec nginx -e stderr -g 'daemon off;'
