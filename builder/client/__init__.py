"""Clients: glm-chat, load generation, LangChain."""
