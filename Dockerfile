# A pytier node in a container (Debian slim, Python from Debian):
#   docker build -t pytier .
#   docker run -d --name pytier --cap-add NET_ADMIN --device /dev/net/tun --network host \
#       -v /etc/pytier/node.toml:/etc/pytier/node.toml:ro pytier
# or flags instead of the file: docker run ... pytier --network-name demo --network-secret s3 -i 10.144.144.1/24
# See docs/service.md.
FROM debian:bookworm-slim

# nftables: the masquerade of --proxy-networks is set with the nft command.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv nftables \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml /src/pytier/
COPY src /src/pytier/src
RUN python3 -m venv /opt/pytier \
    && /opt/pytier/bin/pip install --no-cache-dir --disable-pip-version-check /src/pytier \
    && rm -rf /src

ENV PATH=/opt/pytier/bin:$PATH
# pytier-core removes its TUN device and routes on SIGTERM (docker stop); give it time with -t.
STOPSIGNAL SIGTERM
EXPOSE 11010/tcp 11010/udp
ENTRYPOINT ["pytier-core"]
CMD ["--config-file", "/etc/pytier/node.toml"]
