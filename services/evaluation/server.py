"""The evaluation service: `python -m services.evaluation.server` (port 50054 by default).

A thin gRPC layer over services.evaluation.jobs / report: validate, call the domain, map errors.
"""

from __future__ import annotations

import json

from services.common.errors import InvalidArgumentError, PermissionDeniedError
from services.common.paths import resolve_allowed
from services.common.server import Service, handle_errors, parse_overrides, run_service, to_struct
from services.evaluation import jobs, report
from services.evaluation.evaluate import validate_report_id
from stemlab.v1 import evaluation_pb2, evaluation_pb2_grpc

SERVICE_NAME = "stemlab.v1.EvaluationService"


class EvaluationServicer(evaluation_pb2_grpc.EvaluationServiceServicer):
    def __init__(self, svc: Service):
        self.svc = svc

    @handle_errors
    def StartEvaluation(self, request, context):
        which = request.WhichOneof("model_source")
        params = {
            "dataset": request.dataset,
            "dataset_version": request.dataset_version,
            "split": request.split or "validation",
            "framewise": request.framewise,
            "baselines": list(request.baselines),
            "max_tracks": request.max_tracks,
            "window_seconds": request.window_seconds,
            "serving_address": request.serving_address or self.svc.config.address("serving"),
            "workers": int(self.svc.settings.options.get("score_workers", 0)),
            "overrides": parse_overrides(dict(request.overrides)),
        }
        if request.serving_address and request.serving_address not in self.svc.config.allowed_serving_addresses():
            # Validation audio goes to that address: only to the servers the operator configured.
            raise PermissionDeniedError(
                f"serving address {request.serving_address} is not configured; evaluation talks to "
                f"{', '.join(sorted(self.svc.config.allowed_serving_addresses()))} "
                "(add one with STEMLAB_SERVING_ADDRESSES)")
        if which is not None:
            params[which] = getattr(request, which)
            if which in ("estimates_dir", "saved_model_dir"):  # folders read on this machine
                params[which] = str(resolve_allowed(params[which], self.svc.data.root,
                                                    self.svc.config.import_roots, what=which))
        elif request.baselines_only:
            params["baselines_only"] = True
        else:
            raise InvalidArgumentError(
                "name what to evaluate: model, run, estimates_dir or saved_model_dir (or baselines_only)")
        return self.svc.submit(jobs.JOB_KIND, jobs.check_request(self.svc.data, params))

    @handle_errors
    def GetReport(self, request, context):
        doc = report.load_report(self.svc.data.evaluations, validate_report_id(request.id))
        folder = self.svc.data.evaluations / request.id
        return evaluation_pb2.Report(id=doc["id"], path=str(folder), report=_struct(doc),
                                     markdown=(folder / "report.md").read_text(encoding="utf-8"))

    @handle_errors
    def ListReports(self, request, context):
        out = evaluation_pb2.ListReportsResponse()
        root = self.svc.data.evaluations
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                doc = report.load_report(root, folder.name)
            except (InvalidArgumentError, LookupError):
                continue
            ds = doc["provenance"]["dataset"]
            sdr = doc["medians"].get("model", {}).get("whole", {}).get("instrument", {}).get("sdr")
            out.reports.add(id=doc["id"], created=str(doc["provenance"].get("created", "")),
                            model=report.model_label(doc), dataset=f"{ds['name']}:{ds['version']}",
                            scored=doc["counts"]["scored"], skipped=doc["counts"]["skipped"],
                            instrument_sdr=report.number(sdr))
        return out

    @handle_errors
    def CompareReports(self, request, context):
        a, b = (self._resolve(ref, name) for ref, name in ((request.a, "A"), (request.b, "B")))
        cmp = report.compare_reports(a, b)
        return evaluation_pb2.CompareReportsResponse(
            markdown=cmp["markdown"], comparison=_struct({k: v for k, v in cmp.items() if k != "markdown"}))

    def _resolve(self, ref, name: str) -> dict:
        which = ref.WhichOneof("ref")
        if which == "id":
            return report.load_report(self.svc.data.evaluations, validate_report_id(ref.id))
        if which == "report_json":
            return report.parse_report(ref.report_json, f"report {name}")
        raise InvalidArgumentError(f"report {name}: give an id or a report.json")


def _struct(doc: dict):
    # Struct holds JSON values only: report.json's encoding (inf as strings, NaN as null) already is.
    safe = report.json_safe(doc)
    json.dumps(safe, allow_nan=False)
    return to_struct(safe)


def build() -> Service:
    svc = Service("evaluation")
    svc.register_job(jobs.JOB_KIND, jobs.evaluation_job)
    svc.add_servicer(evaluation_pb2_grpc.add_EvaluationServiceServicer_to_server, EvaluationServicer(svc),
                     SERVICE_NAME)
    return svc


def main() -> None:
    run_service(build)


if __name__ == "__main__":
    main()
