#!/bin/sh
# ftps-gateway container entrypoint: choose the config, check it, become the server.
#
#   (no arguments) or "serve [GLOBAL-OPTIONS]"
#       check-config, then exec `ftps-gateway [GLOBAL-OPTIONS] serve --config FILE`,
#       so the server is PID 1 and receives SIGTERM (drain) and SIGHUP (reload).
#       GLOBAL-OPTIONS: --debug.
#   check-config | explain USER | ban list | ban remove IP | reload
#       run that verb against the same config (--config added unless given):
#       docker compose exec ftps-gateway docker-entrypoint.sh ban list
#   any other verb (hash-password, gen-cert, --version)
#       passed to ftps-gateway unchanged.
#
# The config: $FTPS_CONFIG (default /etc/ftps-gateway/gateway.toml) if that file
# exists; otherwise the shipped container config $FTPS_DEFAULT_CONFIG, which reads
# FTPS_PASSIVE_ADDRESS and friends from the environment (see that file). An
# explicitly set FTPS_CONFIG that does not exist is an error: a typo must not start
# a server with another configuration.
#
# Exit codes are the server's: 3 means the configuration or certificate is unusable
# (the reasons are on stderr, one per line); restarting will not help.
set -eu

EXIT_CONFIG=3

default_config=${FTPS_DEFAULT_CONFIG:-/usr/local/share/ftps-gateway/gateway.container.toml}
if [ -n "${FTPS_CONFIG:-}" ]; then
    config=$FTPS_CONFIG
    if [ ! -f "$config" ]; then
        echo "docker-entrypoint: FTPS_CONFIG=$config: no such file" >&2
        exit "$EXIT_CONFIG"
    fi
elif [ -f /etc/ftps-gateway/gateway.toml ]; then
    config=/etc/ftps-gateway/gateway.toml
else
    config=$default_config
fi

# The shipped config names the node after ${FTPS_NODE_NAME}; default: the host name
# (a container's is its short ID, unless compose or `docker run --hostname` sets it).
if [ -z "${FTPS_NODE_NAME:-}" ]; then
    FTPS_NODE_NAME=$(uname -n)
fi
export FTPS_NODE_NAME

# Uploaded files and logs: not readable by other users of the host.
umask 027

with_config() {
    # Append --config unless the caller gave one.
    for arg in "$@"; do
        case $arg in
            --config | --config=*) exec ftps-gateway "$@" ;;
        esac
    done
    exec ftps-gateway "$@" --config "$config"
}

verb=${1:-serve}
case $verb in
    serve)
        if [ "$#" -gt 0 ]; then shift; fi
        ;;
    check-config | explain | ban | reload)
        with_config "$@"
        ;;
    *)
        exec ftps-gateway "$@"
        ;;
esac

# Validate first, with every problem listed, so that a broken config fails here with
# exit 3 and its reasons instead of inside the server. The summary goes to stderr:
# stdout carries the audit trail.
echo "docker-entrypoint: using $config" >&2
status=0
ftps-gateway "$@" check-config --config "$config" >&2 || status=$?
if [ "$status" -ne 0 ]; then
    echo "docker-entrypoint: $config is not usable (exit $status); server not started" >&2
    exit "$status"
fi

exec ftps-gateway "$@" serve --config "$config"
