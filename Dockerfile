# Images for docker-compose.yml. Both build offline from Debian and PyPI packages only.

# --- the vCenter simulator, built against Debian's govmomi sources ---------------------------
FROM debian:bookworm-slim AS vcsim-build
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      golang-go golang-github-vmware-govmomi-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY tools/vcsim tools/vcsim
RUN bash tools/vcsim/build.sh /out/vcsim

FROM debian:bookworm-slim AS vcsim
COPY --from=vcsim-build /out/vcsim /usr/local/bin/vcsim
EXPOSE 8989
ENTRYPOINT ["/usr/local/bin/vcsim"]

# --- kubegate: CLI, control worker and gateway agent ----------------------------------------
FROM python:3.11-slim AS kubegate
RUN pip install --no-cache-dir uv
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY domain domain
COPY plumbing plumbing
COPY workflows workflows
COPY activities activities
COPY workers workers
COPY starters starters
# read at run time: the installer OVA's builder and its descriptor template
COPY tools/installer tools/installer
# with the tracing extra: traces go out once KUBEGATE_OTEL_ENDPOINT is set
RUN uv sync --frozen --no-dev --extra tracing && ln -s /app/.venv/bin/kubegate /usr/local/bin/kubegate
ENV KUBEGATE_HOME=/var/lib/kubegate
ENTRYPOINT ["kubegate"]
