# Test-only stand-in for python:3.11-slim-bookworm (no registry here): Debian's Python 3.11 on the
# debootstrapped base, laid out as the official image is (python3 in /usr/local/bin, pip usable).
# This machine's CA bundle goes into this stand-in only, so pip/uv reach the package index through
# its proxy; the project's own images never carry it.
FROM commutator-test/debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python3 && ln -s /usr/bin/python3 /usr/local/bin/python
COPY ca-bundle.crt /etc/ssl/certs/test-ca-bundle.crt
ENV PIP_BREAK_SYSTEM_PACKAGES=1 SSL_CERT_FILE=/etc/ssl/certs/test-ca-bundle.crt PIP_CERT=/etc/ssl/certs/test-ca-bundle.crt
CMD ["python3"]
