"""The operator mixin and ``@task.namespace_files``, run through ``dag.test()`` on a real metadata DB."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from airflow.providers.standard.operators.bash import BashOperator

from kestra_perf_provider.exceptions import InvalidNamespaceError, NamespaceFilesConfigError
from kestra_perf_provider.namespace_files import NamespaceFilesMixin
from tests.conftest import REPO_ROOT


class StagedBashOperator(NamespaceFilesMixin, BashOperator):
    pass


DAG_HEADER = """
import os
from pathlib import Path

import pendulum
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, BaseOperator, task

from kestra_perf_provider.namespace_files import NamespaceFilesMixin


class StagedBashOperator(NamespaceFilesMixin, BashOperator):
    pass


class RecordingOperator(NamespaceFilesMixin, BaseOperator):
    def __init__(self, *, record, **kwargs):
        super().__init__(**kwargs)
        self.record = record

    def execute(self, context):
        Path(self.record).write_text(
            "\\n".join([os.getcwd(), context["namespace_files_dir"], ",".join(sorted(os.listdir(".")))])
        )


dag = DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
"""


@pytest.fixture
def namespace(tmp_path):
    root = tmp_path / "ns"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "hello.sh").write_text("echo hello > out.txt\n")
    (root / "notes.tmp").write_text("skip me")
    return root


def run_dag(tmp_path, dag_id, body):
    """Write a DAG file and run it with ``airflow dags test`` in its own process; return the output."""
    dags = tmp_path / "dags"
    dags.mkdir(exist_ok=True)
    (dags / f"{dag_id}.py").write_text(DAG_HEADER.replace("{dag_id}", dag_id) + body)
    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", dag_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.stdout + result.stderr


@pytest.mark.usefixtures("airflow_db")
class TestOperators:
    def test_bash_runs_in_staged_folder(self, namespace, tmp_path):
        record = tmp_path / "pwd.txt"
        output = run_dag(
            tmp_path,
            "mixin_bash",
            f"""
with dag:
    StagedBashOperator(
        task_id="bash",
        namespaces="file://{namespace}",
        namespace_exclude="*.tmp",
        bash_command="bash scripts/hello.sh && pwd > {record} && ls >> {record}",
    )
""",
        )
        assert "state=success" in output, output[-3000:]
        workdir, *listing = record.read_text().split()
        assert "out.txt" in listing
        assert "notes.tmp" not in listing
        assert not Path(workdir).exists()  # The per-try folder is removed after execute().

    def test_custom_operator_and_templated_namespace(self, namespace, tmp_path):
        record = tmp_path / "record.txt"
        output = run_dag(
            tmp_path,
            "mixin_custom",
            f"""
with dag:
    RecordingOperator(
        task_id="custom",
        record="{record}",
        namespaces="file://{{{{ params.root }}}}",
        params={{"root": "{namespace}"}},
        keep_namespace_working_dir=True,
    )
""",
        )
        assert "state=success" in output, output[-3000:]
        cwd, staged_dir, names = record.read_text().splitlines()
        assert os.path.realpath(cwd) == os.path.realpath(staged_dir)
        assert names.split(",") == ["notes.tmp", "scripts"]
        assert Path(staged_dir).is_dir()  # kept on request

    def test_working_dir_if_exists_fail(self, namespace, tmp_path):
        workdir = tmp_path / "work"
        workdir.mkdir()
        (workdir / "notes.tmp").write_text("mine")
        output = run_dag(
            tmp_path,
            "mixin_fail",
            f"""
with dag:
    StagedBashOperator(
        task_id="bash",
        namespaces="file://{namespace}",
        namespace_working_dir="{workdir}",
        namespace_if_exists="fail",
        bash_command="true",
    )
""",
        )
        assert "state=failed" in output, output[-3000:]
        assert "already exist in the working directory" in output
        assert (workdir / "notes.tmp").read_text() == "mine"
        assert not (workdir / "scripts").exists()

    def test_decorated_task_gets_folder(self, namespace, tmp_path):
        output = run_dag(
            tmp_path,
            "mixin_decorator",
            f"""
with dag:

    @task.namespace_files(namespaces=["file://{namespace}"], namespace_include="scripts/**")
    def read_script(namespace_files_dir=None):
        assert os.path.realpath(os.getcwd()) == os.path.realpath(namespace_files_dir)
        assert sorted(os.listdir(".")) == ["scripts"], os.listdir(".")
        return Path("scripts/hello.sh").read_text()

    read_script()
""",
        )
        assert "state=success" in output, output[-3000:]


class TestParseTimeValidation:
    def test_bad_if_exists_names_task(self):
        with pytest.raises(NamespaceFilesConfigError, match="Task 'bad': Invalid if_exists 'sometimes'"):
            StagedBashOperator(task_id="bad", namespaces="s3://b/ns", namespace_if_exists="sometimes", bash_command="true")

    def test_relative_url_names_task(self):
        with pytest.raises(InvalidNamespaceError, match="Task 'bad':.*absolute path"):
            StagedBashOperator(task_id="bad", namespaces="ns/team", bash_command="true")

    def test_template_fields_extended(self):
        assert {"bash_command", "namespaces", "namespace_include"} <= set(StagedBashOperator.template_fields)


@pytest.mark.slow
def test_example_dag_runs(tmp_path):
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "example_dags"),
    }
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", "namespace_files_example"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "team-a: 6 sales, 535.65 EUR" in output
    assert "state=success" in output
    assert output.count("Staged namespace files:") == 2


class TestTaskArguments:
    @pytest.mark.parametrize("value", [0, -1, 1.5, 0.0, "8", True])
    def test_invalid_parallel_downloads(self, value):
        with pytest.raises(NamespaceFilesConfigError, match="Task 'bad': Invalid namespace_parallel_downloads"):
            StagedBashOperator(
                task_id="bad", namespaces="s3://b/ns", namespace_parallel_downloads=value, bash_command="true"
            )

    def test_invalid_cache_placement(self):
        with pytest.raises(NamespaceFilesConfigError, match="Invalid namespace_cache_placement='symlink'"):
            StagedBashOperator(
                task_id="bad", namespaces="s3://b/ns", namespace_cache_placement="symlink", bash_command="true"
            )

    def test_duplicate_folders_rejected(self):
        with pytest.raises(NamespaceFilesConfigError, match="both be staged into folder 'shared'"):
            StagedBashOperator(
                task_id="bad",
                namespaces=["s3://a/shared", "s3://b/shared"],
                folder_per_namespace=True,
                bash_command="true",
            )
