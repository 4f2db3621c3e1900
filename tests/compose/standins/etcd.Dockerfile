# Test-only stand-in for quay.io/coreos/etcd: Debian's etcd (etcd and etcdctl on the PATH, as there).
FROM commutator-test/debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends etcd-server etcd-client \
 && rm -rf /var/lib/apt/lists/*
CMD ["etcd"]
