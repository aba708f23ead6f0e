//! What a chat reply must be: the request's tools or its response format, as the client
//! asked and the plugins left them. Plugins see it as `wisp:policy`'s `tools`,
//! `tool-choice`, `parallel-tool-calls` and `response-format`, and a rewrite of them is
//! read back here by the same checks a client's request gets (request.rs), so a plugin
//! cannot ask for what a client could not.

use serde_json::Value;

use super::Caller;
use super::tools::{Choice, Tools};
use crate::engine::grammar::Constraint;
use crate::engine::template::TemplateMessage;
use crate::error::ApiError;
use crate::policy;
use crate::request::{self, FunctionDef, FunctionKind, JsonSchemaFormat, NamedTool, ResponseFormat, Tool, ToolChoice, ToolName};

/// A checked `response_format` that asks for JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    JsonObject,
    JsonSchema { name: String, schema: Value },
}

/// The tools and the response format of one chat request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shape {
    /// The tools offered (with `tool_choice: none`, offered and not callable).
    pub tools: Option<Tools>,
    pub format: Option<Format>,
}

impl Shape {
    /// The two together: with callable tools, a format shapes the answer the model may give
    /// instead of calls (`tool_choice: auto`), as OpenAI's do; one grammar admits either.
    pub fn new(tools: Option<Tools>, format: Option<Format>) -> Shape {
        Shape { tools, format }
    }

    /// The JSON schema of an answer, when a format asks for one.
    fn answer_schema(&self) -> Option<Value> {
        match &self.format {
            None => None,
            Some(Format::JsonObject) => Some(serde_json::json!({"type": "object"})),
            Some(Format::JsonSchema { schema, .. }) => Some(schema.clone()),
        }
    }

    /// The reply is the tool grammar's JSON, to be read back into `tool_calls`.
    pub fn calls_tools(&self) -> bool {
        self.tools.as_ref().is_some_and(Tools::callable)
    }

    /// The conversation as the model sees it: with the tool prompt when tools are callable.
    pub fn prompt_messages(&self, messages: Vec<TemplateMessage>) -> Vec<TemplateMessage> {
        match &self.tools {
            Some(tools) if tools.callable() => tools.with_prompt(messages, self.answer_schema().as_ref()),
            _ => messages,
        }
    }

    /// The grammar of the reply.
    pub fn constraint(&self) -> Option<Constraint> {
        match (&self.tools, &self.format) {
            (Some(tools), _) if tools.callable() => Some(tools.constraint(self.answer_schema().as_ref())),
            (_, Some(Format::JsonObject)) => Some(Constraint::JsonObject),
            (_, Some(Format::JsonSchema { schema, .. })) => Some(Constraint::JsonSchema(schema.clone())),
            _ => None,
        }
    }

    /// Writes the shape into the request plugins see.
    pub fn to_policy(&self, request: &mut policy::Request) {
        let (tools, choice, parallel) = match &self.tools {
            None => (Vec::new(), policy::ToolChoice::None, true),
            Some(t) => (
                t.functions
                    .iter()
                    .map(|f| policy::Tool {
                        name: f.name.clone(),
                        description: f.description.clone().unwrap_or_default(),
                        parameters: f.parameters.to_string(),
                    })
                    .collect(),
                match &t.choice {
                    Choice::Auto => policy::ToolChoice::Auto,
                    Choice::None => policy::ToolChoice::None,
                    Choice::Required => policy::ToolChoice::Required,
                    Choice::Named(name) => policy::ToolChoice::Function(name.clone()),
                },
                t.parallel,
            ),
        };
        request.tools = tools;
        request.tool_choice = choice;
        request.parallel_tool_calls = parallel;
        request.response_format = match &self.format {
            None => policy::ResponseFormat::Text,
            Some(Format::JsonObject) => policy::ResponseFormat::JsonObject,
            Some(Format::JsonSchema { name, schema }) => {
                policy::ResponseFormat::JsonSchema(policy::JsonSchema { name: name.clone(), schema: schema.to_string() })
            }
        };
    }

    /// The shape the plugins left in `request`, which began as [`Shape::to_policy`] of
    /// `self`: `self` again when they left those fields as they were.
    pub fn after_policy(self, request: &policy::Request) -> Result<Shape, String> {
        let mut before = Caller::default().policy_request("", "", &[], None, 0);
        self.to_policy(&mut before);
        let unchanged = before.tools == request.tools
            && before.tool_choice == request.tool_choice
            && before.parallel_tool_calls == request.parallel_tool_calls
            && before.response_format == request.response_format;
        match unchanged {
            true => Ok(self),
            false => Shape::from_policy(request),
        }
    }

    /// Reads a plugin's rewrite back, by the rules a client's request keeps. The error
    /// names the field and the rule.
    pub fn from_policy(request: &policy::Request) -> Result<Shape, String> {
        let json = |field: String, text: &str| -> Result<Value, String> {
            serde_json::from_str(text).map_err(|e| format!("{field}: not JSON ({e})"))
        };
        let tools = request
            .tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Ok(Tool {
                    kind: FunctionKind::Function,
                    function: FunctionDef {
                        name: t.name.clone(),
                        description: (!t.description.is_empty()).then(|| t.description.clone()),
                        parameters: Some(json(format!("tools[{i}].function.parameters"), &t.parameters)?),
                        strict: None,
                    },
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let choice = match &request.tool_choice {
            policy::ToolChoice::Auto => ToolChoice::Mode("auto".into()),
            policy::ToolChoice::None => ToolChoice::Mode("none".into()),
            policy::ToolChoice::Required => ToolChoice::Mode("required".into()),
            policy::ToolChoice::Function(name) => {
                ToolChoice::Named(NamedTool { kind: FunctionKind::Function, function: ToolName { name: name.clone() } })
            }
        };
        let format = match &request.response_format {
            policy::ResponseFormat::Text => ResponseFormat::Text,
            policy::ResponseFormat::JsonObject => ResponseFormat::JsonObject,
            policy::ResponseFormat::JsonSchema(s) => ResponseFormat::JsonSchema {
                json_schema: JsonSchemaFormat {
                    name: s.name.clone(),
                    description: None,
                    schema: Some(json("response_format.json_schema.schema".into(), &s.schema)?),
                    strict: None,
                },
            },
        };
        let checked = || {
            let tools = request::tools(Some(tools), Some(choice), Some(request.parallel_tool_calls))?;
            Ok(Shape::new(tools, request::format(Some(format))?))
        };
        checked().map_err(|e: ApiError| match e.param {
            Some(param) => format!("{param}: {}", e.message),
            None => e.message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::tools::Function;
    use serde_json::json;

    fn shape() -> Shape {
        let weather = Function {
            name: "get_weather".into(),
            description: Some("The weather in a city".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        };
        Shape { tools: Some(Tools { functions: vec![weather], choice: Choice::Required, parallel: false }), format: None }
    }

    fn policy_request(shape: &Shape) -> policy::Request {
        let mut r = Caller::default().policy_request("chat", "m", &[], None, 0);
        shape.to_policy(&mut r);
        r
    }

    #[test]
    fn a_shape_goes_to_plugins_and_back_unchanged() {
        for shape in [
            shape(),
            Shape::default(),
            Shape { tools: None, format: Some(Format::JsonSchema { name: "n".into(), schema: json!({"type": "integer"}) }) },
        ] {
            assert_eq!(Shape::from_policy(&policy_request(&shape)).unwrap(), shape);
        }
    }

    #[test]
    fn a_plugins_rewrite_keeps_the_rules_of_a_clients_request() {
        let mut r = policy_request(&shape());
        r.tool_choice = policy::ToolChoice::Function("rm_rf".into());
        assert!(Shape::from_policy(&r).unwrap_err().contains("not one of the request's tools"));
        let mut r = policy_request(&shape());
        r.tools[0].parameters = "{not json".into();
        assert!(Shape::from_policy(&r).unwrap_err().starts_with("tools[0].function.parameters: not JSON"));
        let mut r = policy_request(&shape());
        r.tools.push(r.tools[0].clone());
        assert!(Shape::from_policy(&r).unwrap_err().contains("listed twice"));
        let mut r = policy_request(&shape());
        r.tools.clear();
        assert!(Shape::from_policy(&r).unwrap_err().contains("needs `tools`"), "required with no tools left is refused");
    }

    #[test]
    fn the_tool_prompt_and_grammar_apply_only_when_tools_are_callable() {
        let user = vec![TemplateMessage { role: "user".into(), content: "hi".into() }];
        assert!(shape().prompt_messages(user.clone()).len() == 2 && shape().constraint().is_some());
        let mut none = shape();
        none.tools.as_mut().unwrap().choice = Choice::None;
        assert!(!none.calls_tools() && none.constraint().is_none());
        assert_eq!(none.prompt_messages(user.clone()), user);
    }
}
