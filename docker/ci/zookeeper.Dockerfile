# ZooKeeper from Debian's package, the compose test's stand-in for the official image (none can be
# pulled where the tests run). It starts the way the official image does: configured by the ZOO_*
# variables docker-compose.yml sets, data in a volume.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends zookeeper \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY zookeeper-start /usr/local/bin/
RUN mkdir /data && chown zookeeper:zookeeper /data
VOLUME /data
USER zookeeper
ENTRYPOINT ["zookeeper-start"]
