// The page's script (pneumonia.serve): a file of its own, since the server's
// Content-Security-Policy allows no inline script.
//
// Everything the server sends is shown as text, never parsed as markup: the model card travels
// in a checkpoint (a file people exchange) and the file name comes from the upload. So the page
// builds its elements with createElement and fills them with text nodes, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const pct = (x) => (100 * x).toFixed(1) + "%";
const fixed = (x, digits) => Number(x).toFixed(digits);

// An element of `tag` (and `className`) holding `children`: nodes, or values shown as text.
function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children.map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

function metricsTable(title, figures) {
  if (!figures) return [];
  const rows = ["accuracy", "recall", "specificity", "precision", "f1", "auroc"]
    .filter((k) => k in figures)
    .map((k) => {
      const value = el("td", "", fixed(figures[k], 3));
      const ci = (figures.ci95 || {})[k];
      if (ci) value.append(" ", el("span", "small", `(${fixed(ci[0], 3)}\u2013${fixed(ci[1], 3)})`));
      return el("tr", "", el("td", "", k), value);
    });
  return [el("h3", "", `${title} (n=${figures.n})`), el("table", "", ...rows)];
}

function training(card) {
  const trained = card.trained_on || {};
  const perClass = Object.entries(trained.per_class || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  const fed = (card.training || {}).federated;
  const how = fed
    ? `federated: ${fed.strategy}, ${fed.clients} clients (${fed.partition}), ${fed.rounds} rounds x ${fed.local_epochs} local epochs`
    : "centralized";
  return [
    el("p", "", `Trained on ${trained.source}: ${trained.images} images of ${trained.patients} patients (${perClass}); ${how}.`),
    el("p", "", `Reported model: ${(card.training || {}).selected_by || ""}.`),
  ];
}

async function loadCard() {
  const response = await fetch("/model");
  const model = await response.json();
  $("positive-name").textContent = String(model.positive_class).toLowerCase();
  const card = model.card || {};
  const parts = [
    el("p", "", el("strong", "", model.model), `, ${model.image_size} px, checkpoint ${model.checkpoint}`),
  ];
  parts.push(...(card.trained_on
    ? training(card)
    : [el("p", "", "This checkpoint carries no model card (it was written before model cards, or is not a run's best.ckpt).")]));
  const rule = card.threshold_rule && card.threshold_rule !== String(card.threshold)
    ? ` (chosen by ${card.threshold_rule} on the validation images)` : "";
  parts.push(el("p", "", `Decision threshold ${fixed(model.threshold, 3)}${rule}: above it, ${model.positive_class}.`));
  for (const dp of Object.values(card.privacy || {})) {
    parts.push(el("p", "", `Differential privacy (${dp.mechanism}): epsilon ${fixed(dp.epsilon, 2)}, delta ${dp.delta}, protecting ${dp.protects}.`));
  }
  parts.push(...metricsTable("Validation (patients held out of training)", card.val));
  parts.push(...metricsTable("Shift validation (the same patients, simulated other scanners)", card.val_shift));
  parts.push(el("p", "small", `Intervals: 95% bootstrap over patients. ${card.caveat || ""}`));
  $("card-body").replaceChildren(...parts);
}

async function send(file) {
  $("error").textContent = "";
  $("status").textContent = `scoring ${file.name} ...`;
  const form = new FormData();
  form.append("file", file);
  try {
    const response = await fetch("/predict", {method: "POST", body: form});
    const body = await response.json();
    if (!response.ok) throw new Error(body.detail || response.statusText);
    show(body);
    $("status").textContent = `${file.name}: done`;
  } catch (err) {
    $("answer").style.display = "none";
    $("status").textContent = "";
    $("error").textContent = err.message;
  }
}

function show(p) {
  $("probability").textContent = pct(p.probability);
  const positive = p.probability > p.threshold;
  $("decision").textContent = p.decision;
  $("decision").className = positive ? "positive" : "negative";
  $("threshold").textContent = fixed(p.threshold, 3);
  // A three-class model: each class's probability (P(pneumonia) above is their sum but NORMAL's).
  const perClass = Object.keys(p).filter((k) => k.startsWith("p_"));
  $("classes").textContent = perClass.length
    ? perClass.map((k) => `${k.slice(2)} ${pct(p[k])}`).join(" · ") + (p.cause ? ` (likelier cause: ${p.cause})` : "")
    : "";
  $("image").src = "data:image/png;base64," + p.image_png;
  $("heatmap").src = p.heatmap_png ? "data:image/png;base64," + p.heatmap_png : "";
  // An ensemble has no single layer for Grad-CAM to read: the page says so instead of a map.
  $("heatmap").closest("figure").style.display = p.heatmap_png ? "" : "none";
  $("no-heatmap").textContent = p.heatmap_png ? "" : `No Grad-CAM heatmap for model ${p.model}.`;
  $("identity").textContent = `${p.path} · model ${p.model}, ${p.image_size} px, checkpoint ${p.checkpoint}`;
  $("answer").style.display = "block";
}

const drop = $("drop");
drop.addEventListener("click", (e) => { if (e.target !== $("file")) $("file").click(); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", () => { if ($("file").files.length) send($("file").files[0]); });
loadCard().catch((err) => { $("card-body").textContent = "model card unavailable: " + err.message; });
