# Test-only stand-in for nats:2.10-alpine: Debian's nats-server as the entrypoint (flags are the
# command, as in the official image), wget for the health check.
FROM commutator-test/debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nats-server wget \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["nats-server"]
