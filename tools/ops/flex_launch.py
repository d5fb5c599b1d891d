"""A delivery job launched from the Flex Template: ``gcloud dataflow flex-template run``.

It takes the same flags as a launch from a checkout (``job_flags.dataflow_args``): those that
gcloud has a flag of its own for go there, the rest are template parameters. ``--setup_file``
is left out, as the image holds the package, and the image itself is the workers' SDK
container (``sdk_container_image``), so they start with everything installed.
"""

from __future__ import annotations

# Job flags that are gcloud flags of their own, and what gcloud calls them.
GCLOUD_FLAGS = {
    "temp_location": "--temp-location",
    "staging_location": "--staging-location",
    "service_account_email": "--service-account-email",
    "dataflow_kms_key": "--dataflow-kms-key",
    "max_num_workers": "--max-workers",
    "experiments": "--additional-experiments",
}
SWITCHES = {"enable_streaming_engine": "--enable-streaming-engine", "update": "--update"}
LEFT_OUT = {"runner", "job_name", "project", "region", "setup_file", "labels"}  # positional, flags, or the image's


def _split(flag: str) -> tuple[str, str | None]:
    name, _, value = flag.removeprefix("--").partition("=")
    return name, value if "=" in flag else None


def launch_command(job_args: list[str], template: str, image: str) -> list[str]:
    """The ``gcloud dataflow flex-template run`` command for a job with ``job_args``."""
    flags = [_split(flag) for flag in job_args]
    values = {name: value for name, value in flags}
    labels = [value for name, value in flags if name == "labels"]
    command = ["gcloud", "dataflow", "flex-template", "run", values["job_name"]]
    command += [f"--template-file-gcs-location={template}", f"--project={values['project']}"]
    command += [f"--region={values['region']}", f"--additional-user-labels={','.join(labels)}"]
    parameters = [f"sdk_container_image={image}"]
    for name, value in flags:
        if name in SWITCHES:
            command.append(SWITCHES[name])
        elif name in GCLOUD_FLAGS:
            command.append(f"{GCLOUD_FLAGS[name]}={value}")
        elif name not in LEFT_OUT:
            parameters.append(f"{name}={value}")
    if any("," in parameter for parameter in parameters):
        raise ValueError(f"a template parameter holds a comma, which gcloud would split: {parameters}")
    return [*command, f"--parameters={','.join(parameters)}"]
