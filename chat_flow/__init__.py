"""The chat flow's folder, importable so that the project and the standard flow reach its endpoint client.

`chat_flow.endpoint_client` is the one home of the HTTP client (see its docstring for why it lives
here); Prompt flow itself loads this folder's files by path and never imports the package.
"""
