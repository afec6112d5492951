# zklb's images, built from source by `docker compose up --build` (see docker-compose.yml):
#
#   control-plane  zklb-control-plane, configured by ZKLB_* variables; healthy when /readyz is 200
#   demo-backend   the demo HTTP backend, and zklb-agent registering its container's address in
#                  ZooKeeper (health-checked; SIGTERM drains it, then deregisters)
#   filter         zklb_filter.wasm; copies it to /filter (a volume Envoy mounts) and exits
#   filter-module  the module alone: `docker build --target filter-module --output . .` (BuildKit)
#
# The base images are build arguments: BUILD_IMAGE needs cargo and rustup (the filter's wasm
# target is added in the build), RUNTIME_IMAGE a glibc distribution with bash and useradd.
ARG BUILD_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# Everything the runtime stages take from the build lands in /zklb: bin/ and zklb_filter.wasm.
FROM ${BUILD_IMAGE} AS build
RUN rustup target add wasm32-wasip1
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p zklb-control-plane -p zklb-demo-backend -p zklb-agent \
 && scripts/build-filter \
 && mkdir -p /zklb/bin \
 && cp target/release/zklb-control-plane target/release/zklb-demo-backend \
      target/release/zklb-agent /zklb/bin/ \
 && cp target/zklb_filter.wasm /zklb/

FROM scratch AS filter-module
COPY --from=build /zklb/zklb_filter.wasm /

FROM ${RUNTIME_IMAGE} AS runtime
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin zklb
COPY docker/http-check /usr/local/bin/

FROM runtime AS control-plane
COPY --from=build /zklb/bin/zklb-control-plane /usr/local/bin/
# Right for the compose stack: every interface of the container, ZooKeeper by its service name.
ENV ZKLB_LISTEN=0.0.0.0:18000 \
    ZKLB_ZOOKEEPER=zookeeper:2181
EXPOSE 18000
USER zklb
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
  CMD http-check "$ZKLB_LISTEN" /readyz
ENTRYPOINT ["zklb-control-plane"]

FROM runtime AS demo-backend
COPY --from=build /zklb/bin/zklb-demo-backend /zklb/bin/zklb-agent /usr/local/bin/
COPY docker/demo-backend /usr/local/bin/zklb-demo
ENV ZKLB_ZOOKEEPER=zookeeper:2181 \
    ZKLB_SERVICE=echo \
    ZKLB_DEMO_PORT=8080
EXPOSE 8080
USER zklb
# Healthy while the agent has it registered in rotation.
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
  CMD http-check 127.0.0.1:9911 /readyz
ENTRYPOINT ["zklb-demo"]

FROM runtime AS filter
COPY --from=build /zklb/zklb_filter.wasm /usr/share/zklb/
# A volume mounted here for the first time takes this directory's owner, so the copy can write.
RUN mkdir /filter && chown zklb:zklb /filter
USER zklb
CMD ["cp", "/usr/share/zklb/zklb_filter.wasm", "/filter/"]
