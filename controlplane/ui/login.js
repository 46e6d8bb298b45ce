// The login form: a token in the page's URL fragment (/#token=...) logs in by itself. The fragment
// never reaches the server (nor its logs); it is cleared from the address bar and the history
// before the form posts it.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (!token) return;
  history.replaceState(null, "", location.pathname + location.search);
  document.getElementById("token").value = token;
  document.getElementById("login").submit();
});
