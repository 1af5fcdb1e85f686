"use strict";
// The landing page: the curl example names this server.
for (const el of document.querySelectorAll("#origin")) el.textContent = location.origin;
