# The delivery job's Flex Template image: Dataflow's Python template launcher on top of the
# Beam SDK image the workers run, with this package installed (make template builds it with
# Cloud Build and writes the template; docs/dataflow.md, "Flex Template").
#
# One image serves both: Dataflow's launcher VM runs the launcher, which builds the job from
# pipelines/delivery.py with the template's parameters, and the workers run it as their SDK
# container (make deploy passes it as sdk_container_image), so they start with the package
# and its pinned dependencies already installed.
FROM gcr.io/dataflow-templates-base/python311-template-launcher-base:latest AS launcher

FROM apache/beam_python3.11_sdk:2.77.0

COPY --from=launcher /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher

ARG WORKDIR=/template
WORKDIR ${WORKDIR}

COPY setup.py constraints.txt ./
COPY avro_schemas avro_schemas
COPY event_delivery event_delivery
COPY pipelines pipelines
COPY transforms transforms
COPY tools tools
RUN pip install --no-cache-dir -c constraints.txt .

# What the launcher runs, and the package it stages beside it.
ENV FLEX_TEMPLATE_PYTHON_PY_FILE="${WORKDIR}/pipelines/delivery.py"
ENV FLEX_TEMPLATE_PYTHON_SETUP_FILE="${WORKDIR}/setup.py"
# Installed above: the launcher must not download and install the dependencies again.
ENV PIP_NO_DEPS=True

# The SDK harness's entry point: as a worker container the image starts Beam's boot, and
# Dataflow starts the launcher itself on the launcher VM.
ENTRYPOINT ["/opt/apache/beam/boot"]
