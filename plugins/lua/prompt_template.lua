-- Fills {slot} placeholders of a prompt template from inputs, so one graph parameter can vary one part
-- of a prompt. An unknown slot is an error naming it; {{ and }} write literal braces.
diffloom.node {
  name = "PromptTemplate",
  category = "utils/string",
  description = "Fills {subject}, {style}, {extra} in the template.",
  inputs = {
    { "template", "STRING", default = "a photo of {subject}, {style}", multiline = true },
    { "subject", "STRING", default = "" },
    { "style", "STRING", default = "" },
    { "extra", "STRING", default = "" },
  },
  outputs = { { "STRING", "STRING" } },
  execute = function(a)
    local slots = { subject = a.subject, style = a.style, extra = a.extra }
    local text = a.template:gsub("{{", "\1"):gsub("}}", "\2")
    text = text:gsub("{([%w_]*)}", function(name)
      local v = slots[name]
      if v == nil then
        error(string.format("unknown slot {%s} in the template (slots: subject, style, extra)", name), 0)
      end
      return v
    end)
    text = text:gsub("\1", "{"):gsub("\2", "}")
    -- Tidy the commas left by empty slots.
    text = text:gsub(",%s*,", ","):gsub("^%s*,%s*", ""):gsub(",%s*$", "")
    return text
  end,
}
