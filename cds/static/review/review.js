// The reviewer queue's one script (no inline script anywhere): on the decision form, say what each action needs.
// The form works without it; the server checks every decision again.

const form = document.getElementById("decision");

function update() {
  const chosen = form.querySelector("input[name=action]:checked");
  const action = chosen ? chosen.value : "";
  const reason = document.getElementById("reason");
  reason.required = action === "deny";
  document.getElementById("reason-hint").textContent = action === "deny" ? "(required)" : "(required to deny)";
  document.getElementById("field-quantity").hidden = action !== "modify";
  document.getElementById("field-period").hidden = action === "deny";
}

if (form) {
  form.addEventListener("change", update);
  update();
}
