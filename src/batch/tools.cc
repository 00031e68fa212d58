#include "batch/tools.h"

#include <set>
#include <utility>

#include "batch/response.h"

namespace kvb::batch {

namespace {

using nlohmann::json;
using params::TypeName;

bool ValidToolName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
      return false;
  return true;
}

std::string Shown(const std::string& s) { return ToValidUtf8(s.substr(0, 64)); }

}  // namespace

Status ParseMessageTools(const json& msg, const std::string& role, engine::ChatMessage* out, std::string* field) {
  if (auto fc = msg.find("function_call"); fc != msg.end() && !fc->is_null()) {
    *field = ".function_call";
    return Status::FailedPrecondition("is the deprecated form of tool calls and is not supported: use tool_calls");
  }
  if (role == "tool") {
    auto id = msg.find("tool_call_id");
    *field = ".tool_call_id";
    if (id == msg.end() || !id->is_string() || id->get_ref<const std::string&>().empty())
      return Status::InvalidArgument("must be a non-empty string naming the tool call this message answers");
    out->tool_call_id = id->get<std::string>();
  }
  auto calls = msg.find("tool_calls");
  if (calls == msg.end() || calls->is_null() || (calls->is_array() && calls->empty())) return Status::Ok();
  *field = ".tool_calls";
  if (role != "assistant") return Status::InvalidArgument("is only allowed in assistant messages");
  if (!calls->is_array()) return Status::InvalidArgument(std::string("must be an array, but got ") + TypeName(*calls));
  if (calls->size() > static_cast<size_t>(kMaxToolCallsPerMessage))
    return Status::InvalidArgument("has more than " + std::to_string(kMaxToolCallsPerMessage) + " calls");
  for (size_t i = 0; i < calls->size(); ++i) {
    const json& c = (*calls)[i];
    *field = ".tool_calls[" + std::to_string(i) + "]";
    if (!c.is_object()) return Status::InvalidArgument(std::string("must be an object, but got ") + TypeName(c));
    engine::ToolCall call;
    if (auto id = c.find("id"); id != c.end() && !id->is_null()) {
      if (!id->is_string()) return Status::InvalidArgument(".id must be a string");
      call.id = id->get<std::string>();
    }
    if (auto type = c.find("type"); type != c.end() && !type->is_null() && *type != "function")
      return Status::InvalidArgument(".type must be \"function\"");
    auto fn = c.find("function");
    if (fn == c.end() || !fn->is_object()) return Status::InvalidArgument(".function must be an object {name, arguments}");
    auto name = fn->find("name");
    if (name == fn->end() || !name->is_string() || name->get_ref<const std::string&>().empty())
      return Status::InvalidArgument(".function.name must be a non-empty string");
    call.name = name->get<std::string>();
    auto args = fn->find("arguments");
    if (args == fn->end() || args->is_null()) {
      call.arguments = "{}";
    } else if (args->is_string()) {
      call.arguments = args->get<std::string>();
    } else if (args->is_object()) {
      call.arguments = DumpJson(*args);
    } else {
      return Status::InvalidArgument(std::string(".function.arguments must be a JSON string, but got ") +
                                     TypeName(*args));
    }
    out->tool_calls.push_back(std::move(call));
  }
  return Status::Ok();
}

void ParseTools(params::Params& p, std::string_view line, ParsedRequest* r) {
  engine::ChatOptions& o = r->chat_options;
  if (const json* legacy = p.Get("functions"); legacy != nullptr)
    return p.Fail("functions", "'functions' is deprecated and not supported by kvbatch: use 'tools'.");
  if (const json* legacy = p.Get("function_call"); legacy != nullptr)
    return p.Fail("function_call", "'function_call' is deprecated and not supported by kvbatch: use 'tool_choice'.");
  std::set<std::string> names;
  if (const json* tools = p.Get("tools")) {
    if (!tools->is_array()) return p.TypeError("tools", "an array", *tools);
    if (tools->empty()) return p.Fail("tools", "Invalid 'tools': empty array. Expected at least one tool.");
    if (tools->size() > static_cast<size_t>(kMaxTools))
      return p.Fail("tools", "Invalid 'tools': " + std::to_string(tools->size()) + " tools, over the limit of " +
                                 std::to_string(kMaxTools) + ".");
    for (size_t i = 0; i < tools->size(); ++i) {
      const json& t = (*tools)[i];
      const std::string where = "tools[" + std::to_string(i) + "]";
      if (!t.is_object()) return p.TypeError(where, "an object", t);
      auto type = t.find("type");
      if (type == t.end() || *type != "function")
        return p.Fail(where + ".type", "Invalid '" + where + ".type': expected \"function\".");
      auto fn = t.find("function");
      if (fn == t.end() || !fn->is_object())
        return p.Fail(where + ".function", "Invalid '" + where + ".function': expected an object {name, description, parameters}.");
      auto name = fn->find("name");
      if (name == fn->end() || !name->is_string() || !ValidToolName(name->get_ref<const std::string&>()))
        return p.Fail(where + ".function.name",
                      "Invalid '" + where + ".function.name': expected 1 to 64 characters of a-z, A-Z, 0-9, _ and -.");
      engine::ChatTool tool;
      tool.name = name->get<std::string>();
      if (!names.insert(tool.name).second)
        return p.Fail(where + ".function.name", "Invalid 'tools': the function name '" + tool.name + "' is given twice.");
      if (auto d = fn->find("description"); d != fn->end() && !d->is_null()) {
        if (!d->is_string()) return p.TypeError(where + ".function.description", "a string", *d);
        tool.description = d->get<std::string>();
      }
      if (auto s = fn->find("strict"); s != fn->end() && !s->is_null() && !s->is_boolean())
        return p.TypeError(where + ".function.strict", "a boolean", *s);
      if (auto params = fn->find("parameters"); params != fn->end() && !params->is_null()) {
        // The arguments are generated in the schema's order.
        auto text = params::SchemaAt(p, *params, where + ".function.parameters", line,
                                     "/body/tools/" + std::to_string(i) + "/function/parameters");
        if (!text) return;
        tool.parameters = std::move(*text);
      } else {
        tool.parameters = R"({"type":"object","properties":{}})";
      }
      o.tools.push_back(std::move(tool));
    }
  }
  if (const json* pc = p.Get("parallel_tool_calls")) {
    if (!pc->is_boolean()) return p.TypeError("parallel_tool_calls", "a boolean", *pc);
    o.parallel_tool_calls = pc->get<bool>();
  }
  const json* choice = p.Get("tool_choice");
  if (choice == nullptr) return;
  if (choice->is_string()) {
    const std::string& c = choice->get_ref<const std::string&>();
    if (c == "none") o.tool_choice = engine::ToolChoice::kNone;
    else if (c == "auto") o.tool_choice = engine::ToolChoice::kAuto;
    else if (c == "required") o.tool_choice = engine::ToolChoice::kRequired;
    else
      return p.Fail("tool_choice", "Invalid 'tool_choice': expected \"none\", \"auto\", \"required\" or "
                                   "{\"type\":\"function\",\"function\":{\"name\":...}}, but got \"" + Shown(c) + "\".");
  } else if (choice->is_object()) {
    auto type = choice->find("type");
    auto fn = choice->find("function");
    const json* name = nullptr;
    if (fn != choice->end() && fn->is_object())
      if (auto it = fn->find("name"); it != fn->end() && it->is_string()) name = &*it;
    if (type == choice->end() || *type != "function" || name == nullptr)
      return p.Fail("tool_choice", "Invalid 'tool_choice': expected {\"type\":\"function\",\"function\":{\"name\":...}}.");
    o.forced_tool = name->get<std::string>();
    o.tool_choice = engine::ToolChoice::kRequired;
    if (!names.count(o.forced_tool))
      return p.Fail("tool_choice", "Invalid 'tool_choice': the function '" + Shown(o.forced_tool) +
                                       "' is not one of the request's tools.");
  } else {
    return p.TypeError("tool_choice", "a string or an object", *choice);
  }
  if (o.tools.empty() && o.tool_choice == engine::ToolChoice::kRequired)
    p.Fail("tool_choice", "Invalid 'tool_choice': \"required\" needs 'tools'.");
}

}  // namespace kvb::batch
