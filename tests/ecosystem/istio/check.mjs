// Checks Istio manifests against Istio's CRD schemas, as compiled into validators by
// @kubernetes-models/istio (from Istio's crd-all.gen.yaml and the IstioOperator CRD).
// Prints one line per document; exits 1 if any is refused or of a kind it cannot check.
//
//   node check.mjs FILE.yaml...
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { AuthorizationPolicy } from "@kubernetes-models/istio/security.istio.io/v1/AuthorizationPolicy";
import { IstioOperator } from "@kubernetes-models/istio/install.istio.io/v1alpha1/IstioOperator";

const models = {
  "security.istio.io/v1 AuthorizationPolicy": AuthorizationPolicy,
  "install.istio.io/v1alpha1 IstioOperator": IstioOperator,
};

let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length > 0) {
      console.log(`FAIL ${file}: ${doc.errors.map((e) => e.message).join("; ")}`);
      failed++;
      continue;
    }
    const manifest = doc.toJS();
    const kind = `${manifest.apiVersion} ${manifest.kind}`;
    const Model = models[kind];
    if (Model === undefined) {
      console.log(`FAIL ${file}: no schema for ${kind}`);
      failed++;
      continue;
    }
    try {
      new Model(manifest).validate();
      console.log(`ok   ${file}: ${kind} ${manifest.metadata.name}`);
    } catch (e) {
      console.log(`FAIL ${file}: ${kind} ${manifest.metadata?.name}: ${e.message}`);
      failed++;
    }
  }
}
process.exit(failed === 0 ? 0 : 1);
