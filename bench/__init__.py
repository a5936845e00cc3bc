"""Every `glmserve bench ...` command and the traces they replay."""
