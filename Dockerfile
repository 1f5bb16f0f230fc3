# compute-supervisor: a Postgres compute node (Neon compute_ctl compatible) under supervisord.
#
#   podman build --format docker --network host -t compute-supervisor .   (or docker build)
#   podman run --rm --network host compute-supervisor                      # demo compute, on the
#       host's 127.0.0.1:3080 and :55432 only (loopback: its password is `demo`; docs/operations.md)
#   docker run --rm -v $PWD/spec.json:/spec/spec.json:ro -e ... compute-supervisor \
#       -D /var/lib/postgresql/pgdata -C postgresql://cloud_admin@127.0.0.1:55432/postgres \
#       -S /spec/spec.json -b postgres                                      # a real compute
#
# A Neon-patched postgres replaces Debian's either at build time
# (--build-arg PGBIN_DIR=/usr/local/neon/bin plus a COPY/mount of it) or at run time by
# mounting its bin directory on /usr/local/pgsql/bin, which comes first in PATH.
FROM debian:bookworm-slim

ARG PGBIN_DIR=/usr/lib/postgresql/15/bin
# --build-arg WITH_POSTGRES_EXPORTER=1 adds Debian's prometheus-postgres-exporter (run it with
# --postgres-exporter /usr/bin/prometheus-postgres-exporter; it serves port 9187).
ARG WITH_POSTGRES_EXPORTER=0
# Behind a TLS-intercepting proxy: -v /path/ca.crt:/ca.crt:ro --build-arg PIP_CERT=/ca.crt
ARG PIP_CERT=
ENV COMPUTE_VENV=/opt/compute-supervisor/venv \
    PATH=/usr/local/pgsql/bin:${PGBIN_DIR}:/opt/compute-supervisor/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8

# The compute user has a fixed numeric id (999, as in the official postgres images), made
# before Debian's postgresql package would pick one: USER below must be numeric, or a Kubernetes
# pod with runAsNonRoot refuses the image (it cannot tell a user name is not root).
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid 999 --home-dir /var/lib/postgresql --shell /bin/bash postgres

# The same install script CI runs (scripts/install.sh), so CI exercises these steps.
COPY . /src
RUN WITH_POSTGRES_EXPORTER=${WITH_POSTGRES_EXPORTER} /src/scripts/install.sh \
    && rm -rf /var/lib/apt/lists/* /root/.cache \
    && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/pgdata \
    && install -d -o root -g root -m 0755 /etc/compute \
    && cp /src/conf/demo-spec.json /etc/compute/demo-spec.json

# postgres (999:999), by number. On a read-only root filesystem give PGDATA and the runtime dir
# volumes (docs/operations.md, "Kubernetes"; deploy/compute.yaml).
USER 999:999
WORKDIR /var/lib/postgresql
EXPOSE 3080 55432 9187

# compute-ctl answers SIGTERM with a fast shutdown of postgres and exits 0 within a few
# seconds, well inside the default 10 s stop timeout.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/opt/compute-supervisor/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3080/readyz', timeout=2)"]

ENTRYPOINT ["compute-ctl"]
CMD ["-D", "/var/lib/postgresql/pgdata", \
     "-C", "postgresql://cloud_admin@127.0.0.1:55432/postgres", \
     "-S", "/etc/compute/demo-spec.json", \
     "--runtime-dir", "/tmp/compute-ctl", "--http-address", "127.0.0.1"]
