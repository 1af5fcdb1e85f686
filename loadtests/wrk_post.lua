-- wrk script for loadtests.bench: send one prebuilt request and count answers by HTTP status.
--   env BODY_FILE    file holding the exact request body (multipart form built by loadtests.bench)
--   env CONTENT_TYPE its Content-Type header value
--   env METHOD       GET for the HTTP-floor run (no body), default POST
--   env API_KEY      sent as "Authorization: Bearer KEY" when set
--   env HEADER_LENGTH sent as "Inference-Header-Content-Length" when set (OIP binary tensor data)
-- At the end it prints one line "STATUS_JSON {...}" with {status: count}, so 2xx can be told from
-- 503s (wrk's own Requests/sec counts every answer).
local method = os.getenv("METHOD") or "POST"
wrk.method = method
if method == "POST" then
  local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE")
end

local header_length = os.getenv("HEADER_LENGTH")
if header_length and header_length ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = header_length
end

local key = os.getenv("API_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do
      total[code] = (total[code] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(total) do
    table.insert(parts, string.format('"%d": %d', code, n))
  end
  io.write("STATUS_JSON {" .. table.concat(parts, ", ") .. "}\n")
end
