#!/usr/bin/env bash
# Makes sure RabbitMQ (127.0.0.1:5672) and PostgreSQL (127.0.0.1:5432) answer,
# starting the machine's own services when their ports are closed.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 60); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "services: $name did not open port $port within 60 s" >&2
  return 1
}

if ! port_open 5432; then
  echo "services: starting PostgreSQL" >&2
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  else
    echo "services: PostgreSQL is not installed (apt-get install postgresql)" >&2
    exit 1
  fi
  wait_port 5432 PostgreSQL
fi

if ! port_open 5672; then
  echo "services: starting RabbitMQ" >&2
  if command -v rabbitmq-server >/dev/null; then
    rabbitmq-server -detached
  else
    echo "services: RabbitMQ is not installed (apt-get install rabbitmq-server)" >&2
    exit 1
  fi
  wait_port 5672 RabbitMQ
fi
echo "services: RabbitMQ and PostgreSQL are up" >&2
