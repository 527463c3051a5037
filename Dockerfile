# The pipeline's Airflow image: Airflow's official image plus the providers the DAGs use,
# the project package (`drivers`, the library under include/) and the host tools the
# local runtime builds and load-tests drivers with. docker-compose.yaml builds it; the
# tag's version is pyproject.toml's (make images-production).
FROM apache/airflow:3.3.2-python3.11

USER root
# gcc-12, make, clang, llvm, libbpf-dev, pahole, kmod, skopeo, qemu-system-x86,
# busybox-static, ...: one list, scripts/host-deps.sh, for hosts and images alike.
COPY scripts/host-deps.sh /tmp/host-deps.sh
RUN /tmp/host-deps.sh && apt-get clean && rm -rf /var/lib/apt/lists/* /tmp/host-deps.sh

USER airflow
COPY --chown=airflow:0 requirements.txt pyproject.toml /opt/collector-drivers/
COPY --chown=airflow:0 include /opt/collector-drivers/include
# requirements.txt installs the project editable for development; here it is a package.
RUN sed '/^-e /d' /opt/collector-drivers/requirements.txt > /tmp/requirements.txt \
    && pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps /opt/collector-drivers \
    && rm /tmp/requirements.txt
