-- wrk_mix.lua -- a realistic, mixed HTTP/1.1 request stream for wrk.
--
-- Used by benchmarks/make_capture.py to fill a capture with varied traffic
-- against the nginx it configures (static files, /gz/ chunked gzip, /api/
-- JSON endpoints that accept any method).  Standalone use:
--
--   wrk -t2 -c16 -d20s -s benchmarks/wrk_mix.lua http://127.0.0.1:8080 -- MANIFEST [SEED]
--
-- MANIFEST is a tab-separated file written by make_capture.py, one line per
-- served file: category (small|large|gz|page), path, size, etag, last-modified.
-- Without it a built-in list matching make_capture.py's document root is used.
-- SEED (default 1) makes the request mix reproducible per thread.
--
-- Mix (approximate shares of requests):
--   32%  API GETs with cookies and query strings (a third ask for gzip)
--   14%  JSON POSTs, body 64 B .. 48 KiB (log-uniform), to /api/orders|events
--    4%  PUT / PATCH / DELETE on /api/...
--   22%  small static files (<= 32 KiB); a quarter are conditional -> 304
--    6%  large static files (64 KiB .. 2 MiB)
--   12%  /gz/ text and JSON with Accept-Encoding: gzip -> chunked + gzip
--    7%  HTML pages, mostly with Accept-Encoding: gzip
--    3%  404s
-- No HEAD and no Expect: 100-continue: wrk's response parser cannot handle them.

local files = { small = {}, large = {}, gz = {}, page = {} }

local fallback = {
  { "page", "/index.html" }, { "page", "/docs/guide.html" },
  { "small", "/static/css/site.css" }, { "small", "/static/js/app.js" },
  { "small", "/static/img/logo.png" },
  { "small", "/static/files/blob-200.bin" }, { "small", "/static/files/blob-512.bin" },
  { "small", "/static/files/blob-1k.bin" }, { "small", "/static/files/blob-4k.bin" },
  { "small", "/static/files/blob-16k.bin" }, { "small", "/static/files/blob-32k.bin" },
  { "large", "/static/files/blob-64k.bin" }, { "large", "/static/files/blob-256k.bin" },
  { "large", "/static/files/blob-1m.bin" }, { "large", "/static/files/blob-2m.bin" },
  { "gz", "/gz/report-8k.txt" }, { "gz", "/gz/report-32k.txt" },
  { "gz", "/gz/events-256k.txt" }, { "gz", "/gz/catalog-64k.json" },
}

local user_agents = {
  "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
  "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Safari/605.1.15",
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
  "okhttp/4.12.0",
  "python-requests/2.31.0",
}
local search_terms = { "running+shoes", "blue%20jacket", "usb-c+cable", "coffee", "tent%202p",
                       "gift+card", "caf%C3%A9", "a%26b", "wireless+mouse", "socks" }
local sorts = { "price", "rating", "newest", "relevance" }
local filler = string.rep("lorem ipsum dolor sit amet consectetur adipiscing elit ", 1024)

local counter = 0
local threads = {}

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

local function load_manifest(path)
  local f = path and io.open(path, "r")
  if not f then
    for _, e in ipairs(fallback) do
      table.insert(files[e[1]], { path = e[2] })
    end
    return
  end
  for line in f:lines() do
    local cat, p, size, etag, lm = line:match("^([^\t]+)\t([^\t]+)\t([^\t]+)\t([^\t]+)\t([^\t]+)$")
    if cat and files[cat] then
      table.insert(files[cat], { path = p, size = tonumber(size), etag = etag, lm = lm })
    end
  end
  f:close()
end

function init(args)
  load_manifest(args[1])
  local seed = tonumber(args[2] or "1") or 1
  math.randomseed(seed * 7919 + (tid or 0) * 104729)
  for _ = 1, 10 do math.random() end  -- LuaJIT: discard the first draws
end

local function pick(t) return t[math.random(#t)] end

local function base_headers(accept)
  return {
    ["User-Agent"] = pick(user_agents),
    ["Accept"] = accept or "*/*",
    ["Accept-Language"] = (math.random() < 0.7) and "en-US,en;q=0.9" or "de-DE,de;q=0.8,en;q=0.5",
  }
end

local function cookie()
  local c = string.format("session=%08x; theme=%s; ab_bucket=%d",
                          math.random(0, 0x7fffffff), pick({ "dark", "light" }), math.random(0, 9))
  if math.random() < 0.5 then
    c = c .. "; sid=7f3a9c0e2b41d5a8; consent=analytics"
  end
  return c
end

local function api_get()
  local r = math.random(5)
  local path
  if r == 1 then
    path = string.format("/api/users?id=%d&fields=name,email,plan", math.random(1000, 1999))
  elseif r == 2 then
    path = string.format("/api/products?page=%d&per_page=%d&sort=%s&order=%s", math.random(1, 40),
                         pick({ 10, 20, 50 }), pick(sorts), pick({ "asc", "desc" }))
  elseif r == 3 then
    path = string.format("/api/search?q=%s&lang=%s&page=%d", pick(search_terms),
                         pick({ "en", "de", "fr" }), math.random(1, 5))
  elseif r == 4 then
    path = string.format("/api/cart?session=%08x&currency=EUR", math.random(0, 0x7fffffff))
  else
    path = "/api/status"
  end
  local h = base_headers("application/json")
  h["Cookie"] = cookie()
  if math.random() < 0.33 then h["Accept-Encoding"] = "gzip, deflate" end
  if math.random() < 0.2 then h["X-Request-Id"] = string.format("%08x-%04x", math.random(0, 0x7fffffff), math.random(0, 0xffff)) end
  return wrk.format("GET", path, h)
end

local function json_body()
  -- log-uniform size between 64 B and 48 KiB
  local size = math.floor(math.exp(math.log(64) + math.random() * (math.log(49152) - math.log(64))))
  local head = string.format('{"order_id":%d,"customer":"c-%06d","items":[{"sku":"SKU-%08X","qty":%d}],"note":"',
                             math.random(1, 1e9), math.random(0, 999999), math.random(0, 0x7fffffff), math.random(1, 5))
  local pad = size - #head - 2
  if pad < 0 then pad = 0 end
  local start = math.random(1, 1000)
  return head .. filler:sub(start, start + pad - 1) .. '"}'
end

local function api_write()
  local h = base_headers("application/json")
  h["Cookie"] = cookie()
  h["Content-Type"] = "application/json"
  local path = (math.random() < 0.6) and string.format("/api/orders?source=%s", pick({ "web", "app", "pos" }))
                                      or string.format("/api/events?batch=%d", math.random(1, 100000))
  return wrk.format("POST", path, h, json_body())
end

local function api_other()
  local h = base_headers("application/json")
  h["Cookie"] = cookie()
  local r = math.random(3)
  if r == 1 then
    h["Content-Type"] = "application/json"
    return wrk.format("PUT", string.format("/api/users/%d", math.random(1000, 1999)), h,
                      string.format('{"name":"User %d","plan":"%s","newsletter":%s}', math.random(1, 999),
                                    pick({ "free", "pro", "team" }), pick({ "true", "false" })))
  elseif r == 2 then
    h["Content-Type"] = "application/json"
    return wrk.format("PATCH", string.format("/api/cart/items/SKU-%08X", math.random(0, 0x7fffffff)), h,
                      string.format('{"qty":%d}', math.random(0, 9)))
  end
  return wrk.format("DELETE", string.format("/api/sessions/%08x", math.random(0, 0x7fffffff)), h)
end

local function static_get(cat, gzip_share)
  local f = pick(files[cat])
  local h = base_headers()
  if math.random() < 0.4 then h["Cookie"] = cookie() end
  if math.random() < gzip_share then h["Accept-Encoding"] = "gzip, deflate, br" end
  if cat == "small" and f.etag and math.random() < 0.25 then
    if math.random() < 0.5 then h["If-None-Match"] = f.etag else h["If-Modified-Since"] = f.lm end
  end
  local path = f.path
  if math.random() < 0.2 then path = path .. string.format("?v=%d", math.random(1, 20)) end
  return wrk.format("GET", path, h)
end

local function not_found()
  return wrk.format("GET", string.format("/static/img/missing-%d.png?ref=%s", math.random(1, 50),
                                         pick({ "home", "cart", "mail" })), base_headers())
end

-- cumulative weights (percent) -> generator
local mix = {
  { 32, api_get },
  { 46, api_write },
  { 50, api_other },
  { 72, function() return static_get("small", 0.3) end },
  { 78, function() return static_get("large", 0.0) end },
  { 90, function() return static_get("gz", 1.0) end },
  { 97, function() return static_get("page", 0.8) end },
  { 100, not_found },
}

function request()
  local r = math.random() * 100
  for _, e in ipairs(mix) do
    if r < e[1] then return e[2]() end
  end
  return api_get()
end
