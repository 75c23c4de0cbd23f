#!/bin/sh
# The `setup` service of docker-compose.yml. Idempotent: run again, it changes nothing.
# Environment (docker/.env): COUCHDB_USER, COUCHDB_PASSWORD, SERVER_NAME, COUCHLOG_DATABASES,
# COUCHLOG_AGENT_USER; password files in /run/couchlog (docker/secrets).
set -eu
SECRETS=/run/couchlog
export COUCHLOG_ADMIN_PASSWORD="$COUCHDB_PASSWORD"

# The nodes of the cluster profile answer on the container network; the single node is `couchdb`.
nodes=couchdb.couchlog
for other in couchdb2.couchlog couchdb3.couchlog; do
    if getent hosts "$other" >/dev/null; then nodes="$nodes $other"; fi
done
set -- $nodes
if [ $# -gt 1 ]; then
    python3 /opt/couchlog/docker/cluster_join.py "$@"
fi

dbs=""
for db in $COUCHLOG_DATABASES; do dbs="$dbs --db $db"; done
# shellcheck disable=SC2086 # word splitting of $dbs is wanted
agent setup --url http://couchdb.couchlog:5984 --admin "$COUCHDB_USER" $dbs \
    --agent-user "$COUCHLOG_AGENT_USER" --agent-password-file "$SECRETS/agent.password" \
    --public-password-file "$SECRETS/public.password" \
    --reader-password-file "$SECRETS/reader.password"

upstreams=""
for node in $nodes; do upstreams="$upstreams --upstream $node:5984"; done
# shellcheck disable=SC2086
agent setup --nginx --template /opt/couchlog/nginx/couchlog.conf.template \
    --server-name "$SERVER_NAME" --cert /etc/nginx/certs/fullchain.pem \
    --key /etc/nginx/certs/privkey.pem --public-password-file "$SECRETS/public.password" \
    $upstreams -o /etc/nginx/conf.d/couchlog.conf
