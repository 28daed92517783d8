-- Samples the same prompt with consecutive seeds and lays the images out in a grid, to pick a seed.
-- Runs KSampler and VAEDecode through diffloom.call, so it samples exactly as the built-ins do.
diffloom.node {
  name = "SeedSweepGrid",
  category = "sampling",
  description = "count images from seeds seed, seed+1, …, in a grid `columns` wide.",
  inputs = {
    { "model", "MODEL" },
    { "positive", "CONDITIONING" },
    { "negative", "CONDITIONING" },
    { "latent_image", "LATENT" },
    { "vae", "VAE" },
    { "seed", "INT", default = 0, unsigned = true },
    { "count", "INT", default = 4, min = 1, max = 64 },
    { "columns", "INT", default = 2, min = 1, max = 16 },
    { "steps", "INT", default = 20, min = 1, max = 10000 },
    { "cfg", "FLOAT", default = 8.0, min = 0.0, max = 100.0 },
    { "sampler_name", "KSampler.sampler_name", default = "euler" },
    { "scheduler", "KSampler.scheduler", default = "normal" },
  },
  outputs = { { "IMAGE", "IMAGE" } },
  execute = function(a)
    local images = {}
    for i = 0, a.count - 1 do
      local latent = diffloom.call("KSampler", {
        model = a.model, seed = a.seed + i, steps = a.steps, cfg = a.cfg,
        sampler_name = a.sampler_name, scheduler = a.scheduler,
        positive = a.positive, negative = a.negative, latent_image = a.latent_image,
      })
      images[#images + 1] = diffloom.call("VAEDecode", { samples = latent, vae = a.vae })
      diffloom.log(string.format("seed %d done", a.seed + i))
    end
    local blank = images[1] * 0
    local rows = {}
    for r = 0, math.ceil(a.count / a.columns) - 1 do
      local row = {}
      for c = 1, a.columns do
        row[c] = images[r * a.columns + c] or blank
      end
      rows[#rows + 1] = diffloom.cat(row, 2)
    end
    return diffloom.cat(rows, 1)
  end,
}
