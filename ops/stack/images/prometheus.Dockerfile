# Stand-in for prom/prometheus (no registry here): Debian's prometheus package, started the same way
# (ENTRYPOINT the server, the command its flags, data in /prometheus).
ARG DEBIAN_IMAGE=sentiment-stack/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
