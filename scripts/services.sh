#!/usr/bin/env bash
# Makes sure RabbitMQ (127.0.0.1:5672) and PostgreSQL (127.0.0.1:5432) answer:
# starts the machine's own services when their ports are closed, and installs
# them with apt-get first when they are missing (Debian/Ubuntu; as root or
# through sudo). PostgreSQL must accept the `postgres` user from 127.0.0.1
# without a password (trust), as the defaults of DATABASE_URL expect.
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

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else
    echo "services: need root to run: $*" >&2
    return 1
  fi
}

apt_updated=
install() {
  if ! command -v apt-get >/dev/null; then
    echo "services: $1 is not installed and there is no apt-get here: install $1 yourself" >&2
    exit 1
  fi
  echo "services: installing $1 with apt-get" >&2
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -q
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1"
}

if ! port_open 5432; then
  fresh=
  if ! command -v pg_ctlcluster >/dev/null; then
    install postgresql
    fresh=1
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  # A fresh install asks for a password over TCP; the defaults connect as
  # `postgres` without one, from this machine only. An existing installation
  # is left as it is configured.
  if [ -n "$fresh" ] && [ -f "$hba" ]; then
    echo "services: letting postgres connect from 127.0.0.1 without a password ($hba)" >&2
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
  fi
  echo "services: starting PostgreSQL" >&2
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_port 5432 PostgreSQL
fi

if ! port_open 5672; then
  if ! command -v rabbitmq-server >/dev/null; then
    install rabbitmq-server
  fi
  echo "services: starting RabbitMQ" >&2
  as_root rabbitmq-server -detached
  wait_port 5672 RabbitMQ
fi
echo "services: RabbitMQ and PostgreSQL are up" >&2
